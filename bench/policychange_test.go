package bench

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/internal/tstest/cluster"
	"github.com/tulle-net/tulle/internal/tstest/kubetest"
	"github.com/tulle-net/tulle/internal/tstest/topo"
)

// BenchmarkPolicyChange measures a real tulled (podcidr mode, in a network
// namespace, against a real API server) enforcing NetworkPolicy among
// POLICY_PODS pods (default 1,000; 50 on its node, the rest Pod objects
// with addresses on 19 other nodes) and POLICY_COUNT policies (default
// 200): its memory before and after they exist, and the time from a change
// in the API server — a new policy selecting a local pod, or a local pod's
// label that a policy selects — until tulled's table holds it (tulled's
// own apply timestamp), p50 and p99 over 60 changes.
func BenchmarkPolicyChange(b *testing.B) {
	if why := topo.Require(); why != "" {
		b.Skip(why)
	}
	if why := kubetest.Missing(); why != "" {
		b.Skip("needs " + why)
	}
	tulled := os.Getenv("TULLED")
	if tulled == "" {
		b.Skip("set TULLED to a tulled binary (make bench-policy does)")
	}
	pods, policies := envInt("POLICY_PODS", 1000), envInt("POLICY_COUNT", 200)
	const netConf = `{"Network":"100.64.0.0/10","SubnetLen":24,"Backend":{"Type":"udp","Port":8285}}`
	nc, _ := netconf.Parse([]byte(netConf))
	ctx := context.Background()
	for b.Loop() {
		kc, err := kubetest.Start(b.TempDir())
		if err != nil {
			b.Fatal(err)
		}
		defer kc.Stop()
		admin, _ := kc.Client(kubetest.AdminToken)
		local := netconf.SubnetAt(nc.SubnetMin, nc.SubnetLen, 1)
		self := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"}, Spec: corev1.NodeSpec{PodCIDRs: []string{local.String()}}}
		if _, err := admin.CoreV1().Nodes().Create(ctx, self, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		kcfg, err := kc.Kubeconfig(kubetest.AdminToken)
		if err != nil {
			b.Fatal(err)
		}
		cl, err := cluster.Build(topo.Options{Nodes: 1, Prefix: "tlpolc"}, cluster.Options{Tulled: tulled, Dir: b.TempDir(), NetConf: netConf,
			Args: []string{"--lease-store", "kube", "--kubeconfig", kcfg}})
		if err != nil {
			b.Fatal(err)
		}
		stopFwd, err := kc.ForwardInto(cl.Topo.Nodes[0].NS, topo.DoIn)
		if err != nil {
			cl.Close()
			b.Fatal(err)
		}
		defer stopFwd()
		defer cl.Close()
		n := cl.Nodes[0]
		if err := n.Start(); err != nil {
			b.Fatal(err)
		}
		sock := filepath.Join(n.RunDir, api.SocketName)
		waitPolicy(b, sock, "first apply", func(s *api.PolicyStatus) bool { return s.Synced })
		time.Sleep(2 * time.Second)
		rss0 := cluster.ProcStatusKB(n.PID(), "VmRSS:")

		start := time.Now()
		createPolicyWorld(b, admin, nc, pods, policies)
		waitPolicy(b, sock, "every local pod", func(s *api.PolicyStatus) bool { return len(s.Pods) == 50 })
		b.Logf("%d pods and %d policies created and applied in %v", pods, policies, time.Since(start).Round(time.Millisecond))
		time.Sleep(5 * time.Second) // the informers' list buffers are garbage now
		rss1, hwm := cluster.ProcStatusKB(n.PID(), "VmRSS:"), cluster.ProcStatusKB(n.PID(), "VmHWM:")

		var lat []float64
		for i := range 60 {
			var t0 time.Time
			var done func(*api.PolicyStatus) bool
			if i%2 == 0 {
				// A new policy selecting local pod i/2.
				name := fmt.Sprintf("change-%d", i)
				pod := fmt.Sprintf("ns%d/pod-%04d", 0, i/2)
				pol := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "ns0", Name: name},
					Spec: networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"pod": fmt.Sprintf("pod-%04d", i/2)}}}}
				t0 = time.Now()
				if _, err := admin.NetworkingV1().NetworkPolicies("ns0").Create(ctx, pol, metav1.CreateOptions{}); err != nil {
					b.Fatal(err)
				}
				done = func(s *api.PolicyStatus) bool { return podHasPolicy(s, pod, "ns0/"+name) }
			} else {
				// Local pod i/2 gains the label policy "isolate" selects.
				pod, err := admin.CoreV1().Pods("ns0").Get(ctx, fmt.Sprintf("pod-%04d", 20+i/2), metav1.GetOptions{})
				if err != nil {
					b.Fatal(err)
				}
				pod.Labels["isolate"] = "yes"
				t0 = time.Now()
				if _, err := admin.CoreV1().Pods("ns0").Update(ctx, pod, metav1.UpdateOptions{}); err != nil {
					b.Fatal(err)
				}
				key := "ns0/" + pod.Name
				done = func(s *api.PolicyStatus) bool { return podHasPolicy(s, key, "ns0/isolate") }
			}
			s := waitPolicy(b, sock, "change applied", done)
			lat = append(lat, float64(s.Applied.Sub(t0).Microseconds())/1000)
		}
		slices.Sort(lat)
		p50, p99 := percentile(lat, 50), percentile(lat, 99)
		b.Logf("change → enforced on the node: p50 %.1f ms, p99 %.1f ms (60 changes, %d pods, %d policies)", p50, p99, pods, policies)
		b.Logf("tulled RSS: %.1f MiB before, %.1f MiB with them (+%.1f MiB), peak %.1f MiB", rss0/1024, rss1/1024, (rss1-rss0)/1024, hwm/1024)
		b.ReportMetric(p50, "ms-p50")
		b.ReportMetric(p99, "ms-p99")
		b.ReportMetric((rss1-rss0)/1024, "MiB-RSS-growth")
	}
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func podHasPolicy(s *api.PolicyStatus, pod, pol string) bool {
	for _, p := range s.Pods {
		if p.Pod == pod {
			return slices.Contains(p.Policies, pol)
		}
	}
	return false
}

// waitPolicy polls tulled's policy state until ok (30 s at most).
func waitPolicy(b *testing.B, sock, what string, ok func(*api.PolicyStatus) bool) *api.PolicyStatus {
	b.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		s, err := api.GetPolicy(context.Background(), sock)
		if err == nil && ok(s) {
			return s
		}
		if time.Now().After(deadline) {
			b.Fatalf("%s: not within 60 s (%v)", what, err)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// createPolicyWorld makes 10 namespaces of pods (50 of them on n1, in its
// subnet, the rest on other nodes) and the policies: each selects a
// label of a tenth of the pods and allows ingress from another tenth's
// and one ipBlock, on two ports, one of them named; plus "isolate".
func createPolicyWorld(b *testing.B, c kubernetes.Interface, nc *netconf.Config, pods, policies int) {
	ctx := context.Background()
	for i := range 10 {
		if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("ns%d", i), Labels: map[string]string{"team": fmt.Sprint(i % 3)}}}, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		// No controller-manager here to make it.
		if _, err := c.CoreV1().ServiceAccounts(fmt.Sprintf("ns%d", i)).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	work := make(chan int)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for range 32 {
		wg.Go(func() {
			for i := range work {
				node, idx := "n1", i
				if i >= 50 {
					node, idx = fmt.Sprintf("other-%d", i%19), i
				}
				ns := fmt.Sprintf("ns%d", i%10)
				if i < 50 {
					ns = "ns0"
				}
				sub := netconf.SubnetAt(nc.SubnetMin, nc.SubnetLen, 1+(i/50))
				ip := sub.Addr().As4()
				ip[3] = byte(2 + idx%50)
				p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("pod-%04d", i),
					Labels: map[string]string{"pod": fmt.Sprintf("pod-%04d", i), "tenth": fmt.Sprint(i % 10), "app": "bench"}},
					Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "c", Image: "none",
						Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: int32(8000 + i%5)}}}}}}
				created, err := c.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{})
				if err == nil {
					created.Status.Phase = corev1.PodRunning
					created.Status.PodIPs = []corev1.PodIP{{IP: netip.AddrFrom4(ip).String()}}
					created.Status.PodIP = created.Status.PodIPs[0].IP
					_, err = c.CoreV1().Pods(ns).UpdateStatus(ctx, created, metav1.UpdateOptions{})
				}
				if err != nil {
					mu.Lock()
					firstErr = err
					mu.Unlock()
				}
			}
		})
	}
	for i := range pods {
		work <- i
	}
	close(work)
	wg.Wait()
	if firstErr != nil {
		b.Fatal(firstErr)
	}
	proto := corev1.ProtocolTCP
	for i := range policies {
		ns := fmt.Sprintf("ns%d", i%10)
		pol := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("pol-%03d", i)},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"tenth": fmt.Sprint(i % 10)}},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From: []networkingv1.NetworkPolicyPeer{
						{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": fmt.Sprint(i % 3)}}, PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"tenth": fmt.Sprint((i + 1) % 10)}}},
						{IPBlock: &networkingv1.IPBlock{CIDR: fmt.Sprintf("198.18.%d.0/24", i%250), Except: []string{fmt.Sprintf("198.18.%d.128/25", i%250)}}},
					},
					Ports: []networkingv1.NetworkPolicyPort{{Protocol: &proto, Port: ptrIntStr(80)}, {Protocol: &proto, Port: ptrIntStrName("http")}},
				}},
			}}
		if _, err := c.NetworkingV1().NetworkPolicies(ns).Create(ctx, pol, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	iso := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "ns0", Name: "isolate"},
		Spec: networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"isolate": "yes"}}}}
	if _, err := c.NetworkingV1().NetworkPolicies("ns0").Create(ctx, iso, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
}

func ptrIntStr(v int32) *intstr.IntOrString      { x := intstr.FromInt32(v); return &x }
func ptrIntStrName(s string) *intstr.IntOrString { x := intstr.FromString(s); return &x }
