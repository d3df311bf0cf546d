package kube

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/internal/tstest/kubetest"
	"github.com/tulle-net/tulle/internal/tstest/testenv"
	"github.com/tulle-net/tulle/lease"
	"github.com/tulle-net/tulle/lease/storetest"
)

var (
	kc    *kubetest.Cluster
	admin kubernetes.Interface
)

func TestMain(m *testing.M) {
	if why := kubetest.Missing(); why != "" {
		if testenv.Strict() {
			fmt.Fprintln(os.Stderr, "kube integration tests need", why)
			os.Exit(1)
		}
		fmt.Fprintln(os.Stderr, "skipping kube integration tests: missing", why)
		os.Exit(m.Run()) // unit tests still run; integration tests skip
	}
	dir, _ := os.MkdirTemp("", "tulle-kubetest-")
	var err error
	if kc, err = kubetest.Start(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	admin, _ = kc.Client(kubetest.AdminToken)
	code := m.Run()
	kc.Stop()
	os.RemoveAll(dir)
	os.Exit(code)
}

func needAPI(t *testing.T) {
	t.Helper()
	if kc == nil {
		testenv.Skip(t, "no kube-apiserver/etcd: %s", kubetest.Missing())
	}
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func netConf(t *testing.T, doc string) *netconf.Config {
	t.Helper()
	c, err := netconf.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

const dualStack = `{"Network":"100.96.0.0/12","EnableIPv6":true,"IPv6Network":"fd00:96::/48","IPv6SubnetLen":64}`

func attrs(ip string) lease.Attrs {
	return lease.Attrs{PublicIP: netip.MustParseAddr(ip), Backend: lease.Backend{Type: "udp", Port: 8285}}
}

func newStore(t *testing.T, c kubernetes.Interface, mode Mode, nc *netconf.Config, ns string, ttl time.Duration) *Store {
	t.Helper()
	s, err := New(Options{Client: c, Net: nc, Mode: mode, Namespace: ns, TTL: ttl, ProbeInterval: 500 * time.Millisecond, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func createNode(t *testing.T, name string, cidrs ...string) {
	t.Helper()
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.NodeSpec{PodCIDRs: cidrs}}
	if len(cidrs) > 0 {
		n.Spec.PodCIDR = cidrs[0]
	}
	if _, err := admin.CoreV1().Nodes().Create(context.Background(), n, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { admin.CoreV1().Nodes().Delete(context.Background(), name, metav1.DeleteOptions{}) })
}

// waitPeers reads snapshots until want(peers) holds.
func waitPeers(t *testing.T, ch <-chan []lease.Peer, what string, want func([]lease.Peer) bool) []lease.Peer {
	t.Helper()
	timeout := time.After(60 * time.Second)
	var last []lease.Peer
	for {
		select {
		case p := <-ch:
			last = p
			if want(p) {
				return p
			}
		case <-timeout:
			t.Fatalf("timed out waiting for %s; last snapshot: %+v", what, last)
		}
	}
}

func names(p []lease.Peer) string {
	s := ""
	for _, x := range p {
		s += x.Node + " "
	}
	return s
}

func TestPodCIDRMode(t *testing.T) {
	needAPI(t)
	nc := netConf(t, dualStack)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	subnets := map[string][2]string{}
	for i := 1; i <= 3; i++ {
		n := fmt.Sprintf("pc-n%d", i)
		v4, v6 := fmt.Sprintf("100.96.%d.0/24", i), fmt.Sprintf("fd00:96:0:%x::/64", i)
		createNode(t, n, v4, v6)
		subnets[n] = [2]string{v4, v6}
	}
	var leases []lease.Lease
	for i := 1; i <= 3; i++ {
		n := fmt.Sprintf("pc-n%d", i)
		l, err := newStore(t, admin, ModePodCIDR, nc, "", 0).Claim(ctx, n, attrs(fmt.Sprintf("198.18.0.%d", i)))
		if err != nil {
			t.Fatal(err)
		}
		if l.Subnet.String() != subnets[n][0] || l.IPv6Subnet.String() != subnets[n][1] {
			t.Errorf("%s claimed %s %s, want %v", n, l.Subnet, l.IPv6Subnet, subnets[n])
		}
		leases = append(leases, l)
	}
	// Published: annotations and the NetworkUnavailable condition.
	node, err := admin.CoreV1().Nodes().Get(ctx, "pc-n1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if node.Annotations[AnnPublicIP] != "198.18.0.1" || node.Annotations[AnnBackendType] != "udp" || node.Annotations[AnnBackendData] != `{"port":8285}` {
		t.Errorf("annotations: %v", node.Annotations)
	}
	if !hasCondition(node) {
		t.Errorf("NetworkUnavailable not False/TulleIsUp: %+v", node.Status.Conditions)
	}

	s1 := newStore(t, admin, ModePodCIDR, nc, "", 0)
	ch, err := s1.WatchPeers(ctx, "pc-n1")
	if err != nil {
		t.Fatal(err)
	}
	only := func(want ...string) func([]lease.Peer) bool {
		return func(p []lease.Peer) bool {
			got := map[string]bool{}
			for _, x := range p {
				if x.Node[:3] == "pc-" {
					got[x.Node] = true
				}
			}
			if len(got) != len(want) {
				return false
			}
			for _, w := range want {
				if !got[w] {
					return false
				}
			}
			return true
		}
	}
	p := waitPeers(t, ch, "n2 and n3", only("pc-n2", "pc-n3"))
	for _, x := range p {
		if x.Node == "pc-n2" && (x.Subnet.String() != "100.96.2.0/24" || x.IPv6Subnet.String() != "fd00:96:0:2::/64" || x.Attrs.PublicIP.String() != "198.18.0.2" || x.Attrs.Backend.Port != 8285) {
			t.Errorf("peer n2 = %+v", x)
		}
	}
	if err := s1.Ready(); err != nil {
		t.Errorf("Ready: %v", err)
	}

	// Bad data is ignored, never fatal.
	bad := map[string]map[string]string{
		"pc-bad-outside": {AnnBackendType: "udp", AnnBackendData: `{"port":8285}`, AnnPublicIP: "198.18.0.9"},
		"pc-bad-json":    {AnnBackendType: "udp", AnnBackendData: `{port`, AnnPublicIP: "198.18.0.9"},
		"pc-bad-backend": {AnnBackendType: "ipip", AnnBackendData: `{"port":1}`, AnnPublicIP: "198.18.0.9"},
		"pc-bad-ip":      {AnnBackendType: "udp", AnnBackendData: `{"port":8285}`, AnnPublicIP: "fd00::1"},
	}
	for name, ann := range bad {
		cidr := "100.96.9.0/24"
		if name == "pc-bad-outside" {
			cidr = "100.200.9.0/24"
		}
		createNode(t, name, cidr, "fd00:96:0:99::/64")
		if _, err := admin.CoreV1().Nodes().Patch(ctx, name, "application/merge-patch+json", []byte(fmt.Sprintf(`{"metadata":{"annotations":%s}}`, mustJSON(ann))), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// A fourth good node arrives after the bad ones: it shows up, they do not.
	createNode(t, "pc-n4", "100.96.4.0/24", "fd00:96:0:4::/64")
	if _, err := newStore(t, admin, ModePodCIDR, nc, "", 0).Claim(ctx, "pc-n4", attrs("198.18.0.4")); err != nil {
		t.Fatal(err)
	}
	waitPeers(t, ch, "n2, n3, n4 and none of the bad nodes", only("pc-n2", "pc-n3", "pc-n4"))
	s1.mu.Lock()
	warned := len(s1.warned)
	s1.mu.Unlock()
	if warned < len(bad) {
		t.Errorf("%d bad nodes logged, want %d", warned, len(bad))
	}

	// A deleted Node leaves every table.
	if err := admin.CoreV1().Nodes().Delete(ctx, "pc-n3", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitPeers(t, ch, "n3 gone", only("pc-n2", "pc-n4"))

	// Release removes the annotations; the node then is no peer.
	if err := newStore(t, admin, ModePodCIDR, nc, "", 0).Release(ctx, leases[1]); err != nil {
		t.Fatal(err)
	}
	waitPeers(t, ch, "n2 released", only("pc-n4"))
}

func mustJSON(m map[string]string) string {
	s := "{"
	first := true
	for k, v := range m {
		if !first {
			s += ","
		}
		first = false
		s += fmt.Sprintf("%q:%q", k, v)
	}
	return s + "}"
}

func createNamespace(t *testing.T, name string) {
	t.Helper()
	_, err := admin.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { admin.CoreV1().Namespaces().Delete(context.Background(), name, metav1.DeleteOptions{}) })
}

func TestLeaseMode(t *testing.T) {
	needAPI(t)
	createNamespace(t, "lease-mode")
	nc := netConf(t, `{"Network":"100.96.0.0/20","SubnetLen":24,"SubnetMin":"100.96.0.0","EnableIPv6":true,"IPv6Network":"fd00:96::/56","IPv6SubnetLen":64}`)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// 16 subnets, 20 nodes claiming at once: 16 distinct winners, 4 exhausted.
	var mu sync.Mutex
	won := map[netip.Prefix]string{}
	won6 := map[netip.Prefix]string{}
	exhausted := 0
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Go(func() {
			node := fmt.Sprintf("lm-n%d", i)
			l, err := newStore(t, admin, ModeLease, nc, "lease-mode", time.Hour).Claim(ctx, node, attrs("198.18.0.1"))
			mu.Lock()
			defer mu.Unlock()
			switch {
			case errors.Is(err, lease.ErrExhausted):
				exhausted++
			case err != nil:
				t.Errorf("%s: %v", node, err)
			default:
				if o, dup := won[l.Subnet]; dup {
					t.Errorf("%s given to %s and %s", l.Subnet, o, node)
				}
				if o, dup := won6[l.IPv6Subnet]; dup {
					t.Errorf("%s given to %s and %s", l.IPv6Subnet, o, node)
				}
				won[l.Subnet], won6[l.IPv6Subnet] = node, node
			}
		})
	}
	wg.Wait()
	if len(won) != 16 || exhausted != 4 {
		t.Fatalf("%d winners, %d exhausted; want 16 and 4", len(won), exhausted)
	}
	// A restarted node gets its subnet back.
	// (Any winner: which 16 of the 20 win is the race's.)
	var n0 netip.Prefix
	owner := ""
	for p, n := range won {
		if owner == "" || n < owner {
			n0, owner = p, n
		}
	}
	// The same node restarting (same address, new backend data) gets its
	// subnet back and republishes.
	restart := attrs("198.18.0.1")
	restart.Backend.Port = 8299
	l, err := newStore(t, admin, ModeLease, nc, "lease-mode", time.Hour).Claim(ctx, owner, restart)
	if err != nil || l.Subnet != n0 {
		t.Errorf("restart of %s got %s, %v; want %s", owner, l.Subnet, err, n0)
	}
	// Peers: every other holder, with the republished attributes.
	s := newStore(t, admin, ModeLease, nc, "lease-mode", time.Hour)
	ch, err := s.WatchPeers(ctx, "someone-else")
	if err != nil {
		t.Fatal(err)
	}
	p := waitPeers(t, ch, "16 peers", func(p []lease.Peer) bool { return len(p) == 16 })
	for _, x := range p {
		if x.Node == owner && x.Attrs.Backend.Port != 8299 {
			t.Errorf("republished attrs not seen: %+v", x.Attrs)
		}
	}
}

// TestLeaseModeConformance runs the lease.Store contract on Leases in a
// real API server, with a fake clock shared by the stores (the holders'
// renew times and this node's observations both follow it).
func TestLeaseModeConformance(t *testing.T) {
	needAPI(t)
	n := 0
	storetest.Run(t, func(t *testing.T) storetest.Harness {
		n++
		ns := fmt.Sprintf("conformance-%d", n)
		createNamespace(t, ns)
		var mu sync.Mutex
		now := time.Now()
		clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
		return storetest.Harness{
			Open: func(t *testing.T, c *netconf.Config) storetest.Store {
				s, err := New(Options{Client: admin, Net: c, Mode: ModeLease, Namespace: ns, TTL: time.Minute, ProbeInterval: 500 * time.Millisecond, Logger: quiet(), Now: clock})
				if err != nil {
					t.Fatal(err)
				}
				return s
			},
			Advance: func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() },
			TTL:     time.Minute,
		}
	})
}

// TestAPIServerRestart: the watch keeps the last peers while the API server
// is down, reports not ready, and catches up when it is back.
func TestAPIServerRestart(t *testing.T) {
	needAPI(t)
	nc := netConf(t, dualStack)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	createNode(t, "rs-n1", "100.96.31.0/24", "fd00:96:0:31::/64")
	createNode(t, "rs-n2", "100.96.32.0/24", "fd00:96:0:32::/64")
	s2 := newStore(t, admin, ModePodCIDR, nc, "", 0)
	l2, err := s2.Claim(ctx, "rs-n2", attrs("198.18.0.32"))
	if err != nil {
		t.Fatal(err)
	}
	s1 := newStore(t, admin, ModePodCIDR, nc, "", 0)
	ch, err := s1.WatchPeers(ctx, "rs-n1")
	if err != nil {
		t.Fatal(err)
	}
	has := func(n string) func([]lease.Peer) bool {
		return func(p []lease.Peer) bool {
			for _, x := range p {
				if x.Node == n {
					return true
				}
			}
			return false
		}
	}
	waitPeers(t, ch, "rs-n2", has("rs-n2"))

	kc.StopAPIServer()
	// Renewals fail (and are retried by the caller); the watch sends no
	// empty snapshot, and Ready turns into an error.
	if _, err := s2.Renew(ctx, l2); err == nil {
		t.Error("renew succeeded with the API server down")
	}
	deadline := time.Now().Add(30 * time.Second)
	for s1.Ready() == nil && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if s1.Ready() == nil {
		t.Error("store still ready with the API server down")
	}
	select {
	case p := <-ch:
		t.Errorf("snapshot while the API server is down: %s", names(p))
	default:
	}
	if err := kc.StartAPIServer(); err != nil {
		t.Fatal(err)
	}
	createNode(t, "rs-n3", "100.96.33.0/24", "fd00:96:0:33::/64")
	if _, err := newStore(t, admin, ModePodCIDR, nc, "", 0).Claim(ctx, "rs-n3", attrs("198.18.0.33")); err != nil {
		t.Fatal(err)
	}
	waitPeers(t, ch, "rs-n3 after the restart", func(p []lease.Peer) bool { return has("rs-n2")(p) && has("rs-n3")(p) })
	deadline = time.Now().Add(30 * time.Second)
	for s1.Ready() != nil && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if err := s1.Ready(); err != nil {
		t.Errorf("not ready after the API server came back: %v", err)
	}
}
