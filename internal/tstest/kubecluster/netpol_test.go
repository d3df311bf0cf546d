package kubecluster_test

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tulle-net/tulle/internal/tstest/kubecluster"
	"github.com/tulle-net/tulle/internal/tstest/testenv"
)

// TestNetworkPolicy checks, in the real cluster, what the upstream Netpol
// suite does not: named ports that differ between pods, endPort, ipBlock
// with except (and a non-canonical CIDR), same-node egress-allow with
// ingress-deny, a peer selector matching nothing, IPv6, an established
// connection outliving a policy that would refuse it, a new pod's very
// first packet, and tulled restarting without a moment of allow-all.
func TestNetworkPolicy(t *testing.T) {
	if testing.Short() {
		t.Skip("a whole cluster: not in -short")
	}
	testenv.Require(t, kubecluster.Missing())
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	c, _ := startCluster(t, ctx, kubecluster.Options{Nodes: 2})
	tag := kubecluster.RandomTag("np")
	installTulle(t, ctx, c, kubecluster.Overlay{Tag: tag, NetConf: netConf(`{"Type":"udp","Port":8285}`)})
	ns := "np"
	if _, err := c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{"np": "yes"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitServiceAccount(ctx, ns); err != nil {
		t.Fatal(err)
	}
	n1, n2 := c.Nodes[0].Name, c.Nodes[1].Name
	np := &netpol{t: t, ctx: ctx, c: c, ns: ns}
	// Servers: a on n1 ("web" is 8080), b on n2 ("web" is 9090; it serves
	// 8080 too, unnamed). Clients on both nodes.
	srvA := np.pod("srv-a", n1, map[string]string{"role": "server", "app": "a"}, nil, []corev1.ContainerPort{{Name: "web", ContainerPort: 8080}})
	srvB := np.pod("srv-b", n2, map[string]string{"role": "server", "app": "b"}, []string{"--also", "9090"}, []corev1.ContainerPort{{Name: "web", ContainerPort: 9090}, {ContainerPort: 8080}})
	cli1 := np.pod("cli-1", n1, map[string]string{"role": "client"}, nil, nil)
	cli2 := np.pod("cli-2", n2, map[string]string{"role": "client"}, nil, nil)
	a4, a6 := kubecluster.PodIPs(srvA)
	b4, _ := kubecluster.PodIPs(srvB)
	every := []*corev1.Pod{cli1, cli2}

	t.Run("NoPolicy", func(t *testing.T) {
		np.expect(t, every, a4, 8080, true)
		np.expect(t, every, b4, 9090, true)
	})
	t.Run("NamedPortPerPod", func(t *testing.T) {
		np.apply(t, "web", map[string]string{"role": "server"}, networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{
			Ports: []networkingv1.NetworkPolicyPort{{Port: ptr(intstr.FromString("web"))}}}}})
		np.expect(t, every, a4, 8080, true)
		np.expect(t, every, b4, 9090, true)
		// 8080 is a's "web", not b's: never the union of the numbers.
		np.expect(t, every, b4, 8080, false)
	})
	t.Run("EndPort", func(t *testing.T) {
		np.apply(t, "range", map[string]string{"app": "b"}, networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{
			Ports: []networkingv1.NetworkPolicyPort{{Port: ptr(intstr.FromInt32(9000)), EndPort: ptr(int32(9100))}}}}})
		np.expect(t, every, b4, 9090, true)
		np.expect(t, every, b4, 8080, false)
	})
	t.Run("IPBlockExcept", func(t *testing.T) {
		// a's address with /0: the API keeps the host bits, the block is
		// everything; the except cuts b out of this peer only.
		np.apply(t, "block", map[string]string{"role": "client"}, networkingv1.NetworkPolicySpec{
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
			Egress:      []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: a4 + "/0", Except: []string{b4 + "/32"}}}}}}})
		np.expect(t, every, a4, 8080, true)
		np.expect(t, every, b4, 9090, false)
	})
	t.Run("SameNodeEgressAllowIngressDeny", func(t *testing.T) {
		np.apply(t, "cli-egress", map[string]string{"role": "client"}, networkingv1.NetworkPolicySpec{
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}, Egress: []networkingv1.NetworkPolicyEgressRule{{}}})
		np.apply(t, "a-deny", map[string]string{"app": "a"}, networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}})
		// cli-1 shares a's node: its egress allows, a's ingress refuses.
		np.expect(t, every, a4, 8080, false)
		np.expect(t, every, b4, 9090, true)
	})
	t.Run("PeerMatchingNothing", func(t *testing.T) {
		np.apply(t, "nobody", map[string]string{"app": "a"}, networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{
			From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "nobody"}}}}}}})
		np.expect(t, every, a4, 8080, false)
	})
	t.Run("IPv6", func(t *testing.T) {
		if a6 == "" {
			t.Fatalf("srv-a has no IPv6 address: %v", srvA.Status.PodIPs)
		}
		np.apply(t, "from-cli-2", map[string]string{"app": "a"}, networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{
			From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "client"}}}}}}})
		np.expect(t, every, a6, 8080, true)
		np.expect(t, []*corev1.Pod{srvB}, a6, 8080, false)
	})
	t.Run("EstablishedOutlivesPolicy", func(t *testing.T) {
		// cli-2 streams 6 s from a; 2 s in, a policy refuses cli-2. The
		// connection was allowed when it began and carries on (conntrack
		// established); a new one is refused.
		done := make(chan error, 1)
		go func() {
			out, err := c.PodGet(ctx, cli2, mustV4(cli2), "/fetch?url="+"http://"+net.JoinHostPort(a4, "8080")+"/stream%3Fbytes%3D600000%26rate%3D100000")
			if err == nil && !strings.Contains(out, `"bytes":600000`) {
				err = fmt.Errorf("fetch: %s", out)
			}
			done <- err
		}()
		time.Sleep(2 * time.Second)
		np.apply(t, "a-deny", map[string]string{"app": "a"}, networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}})
		np.expect(t, []*corev1.Pod{cli2}, a4, 8080, false)
		if err := <-done; err != nil {
			t.Errorf("established stream cut by a later policy: %v", err)
		}
	})
	t.Run("NewPodFirstPacket", func(t *testing.T) {
		np.apply(t, "deny-new", map[string]string{"window": "deny"}, networkingv1.NetworkPolicySpec{
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}})
		target := net.JoinHostPort(b4, "9090")
		for _, tc := range []struct {
			label, want string
		}{{"deny", "failed"}, {"allow", "connected"}} {
			p := np.pod("new-"+tc.label, n1, map[string]string{"window": tc.label}, []string{"--first-dial", target}, nil)
			out, err := c.PodGet(ctx, p, mustV4(p), "/first")
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(out, tc.want) {
				t.Errorf("pod %s (window=%s): first packet to %s: %q, want %s", p.Name, tc.label, target, out, tc.want)
			}
		}
		// What waiting for the rules costs an ADD, as n1's tulled counts it.
		if m, err := c.Node(n1).Get(ctx, "http://127.0.0.1:9107/metrics"); err == nil {
			for _, l := range strings.Split(m, "\n") {
				if strings.HasPrefix(l, "tulle_policy_attach_seconds_sum") || strings.HasPrefix(l, "tulle_policy_attach_seconds_count") {
					t.Log(l)
				}
			}
		}
	})
	// Peers are matched by source address, which every backend keeps:
	// the same policy across nodes over each of them (tulled restarts with
	// the new net-conf, rules in place throughout).
	for _, be := range []struct{ name, conf string }{
		{"vxlan", `{"Type":"vxlan"}`}, {"host-gw", `{"Type":"host-gw"}`}, {"wireguard", `{"Type":"wireguard","Port":51820,"Mode":"auto"}`},
	} {
		t.Run("Backend/"+be.name, func(t *testing.T) {
			np.apply(t, "clients-only", map[string]string{"app": "a"}, networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "client"}}}}}}})
			np.apply(t, "b-egress", map[string]string{"app": "b"}, networkingv1.NetworkPolicySpec{
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}})
			switchBackend(t, ctx, c, tag, be.conf)
			waitPeersBackend(t, ctx, c.Node(n1), be.name, 1)
			np.expect(t, []*corev1.Pod{cli2}, a4, 8080, true)
			np.expect(t, []*corev1.Pod{cli2}, a6, 8080, true)
			np.expect(t, []*corev1.Pod{srvB}, a4, 8080, false)
			// b's egress is denied on its own node, whatever carries it.
			np.expect(t, []*corev1.Pod{srvB}, mustV4(cli1), 8080, false)
			np.expect(t, []*corev1.Pod{cli2}, mustV4(cli1), 8080, true)
		})
	}
	t.Run("RestartWithoutWindow", func(t *testing.T) {
		np.apply(t, "a-deny", map[string]string{"app": "a"}, networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}})
		np.expect(t, []*corev1.Pod{cli1}, a4, 8080, false)
		// Kill n1's tulled (the kubelet restarts it) and probe throughout:
		// not one connection may get through.
		node := c.Node(n1)
		pid := tulledPID(t, node)
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		killed := time.Now()
		deadline := killed.Add(20 * time.Second)
		restarted := false
		for time.Now().Before(deadline) {
			if _, err := c.Probe(ctx, cli1, mustV4(cli1), "tcp", net.JoinHostPort(a4, "8080")); err == nil {
				t.Fatalf("cli-1 reached srv-a while n1's tulled restarted")
			}
			if !restarted {
				// The killed tulled answers nothing: an answer is the new one.
				if st, err := node.TulleStatus(ctx); err == nil && st.NotReady == "" {
					restarted = true
					t.Logf("tulled on %s back and ready %s after SIGKILL", n1, time.Since(killed).Round(100*time.Millisecond))
				}
			}
		}
		if !restarted {
			t.Fatalf("tulled on %s not back and ready in 20 s", n1)
		}
		np.deleteAll(t)
		np.expect(t, []*corev1.Pod{cli1}, a4, 8080, true)
	})
}

func ptr[T any](v T) *T { return &v }

func mustV4(p *corev1.Pod) string { v4, _ := kubecluster.PodIPs(p); return v4 }

// netpol drives TestNetworkPolicy's namespace.
type netpol struct {
	t   *testing.T
	ctx context.Context
	c   *kubecluster.Cluster
	ns  string
}

// pod runs a test pod on node and returns it once Ready.
func (n *netpol) pod(name, node string, labels map[string]string, args []string, ports []corev1.ContainerPort) *corev1.Pod {
	n.t.Helper()
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
		Spec: corev1.PodSpec{
			NodeName:                      node,
			TerminationGracePeriodSeconds: ptr(int64(1)),
			Containers: []corev1.Container{{
				Name: "testpod", Image: kubecluster.TestImage, ImagePullPolicy: corev1.PullNever,
				Args: args, Ports: ports, // the entrypoint is "testpod serve"
				ReadinessProbe: &corev1.Probe{
					ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/", Port: intstr.FromInt32(kubecluster.TestPodPort)}},
					PeriodSeconds: 1,
				},
			}},
		},
	}
	if _, err := n.c.Client.CoreV1().Pods(n.ns).Create(n.ctx, p, metav1.CreateOptions{}); err != nil {
		n.t.Fatalf("create pod %s: %v", name, err)
	}
	deadline := time.Now().Add(90 * time.Second)
	for {
		got, err := n.c.Client.CoreV1().Pods(n.ns).Get(n.ctx, name, metav1.GetOptions{})
		if err == nil && len(got.Status.PodIPs) > 0 {
			for _, cond := range got.Status.Conditions {
				if cond.Type == corev1.PodReady && cond.Status == corev1.ConditionTrue {
					return got
				}
			}
		}
		if time.Now().After(deadline) {
			n.t.Fatalf("pod %s not Ready in 90 s: %v", name, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// apply creates a policy selecting sel, removed when the subtest ends.
func (n *netpol) apply(t *testing.T, name string, sel map[string]string, spec networkingv1.NetworkPolicySpec) {
	t.Helper()
	spec.PodSelector = metav1.LabelSelector{MatchLabels: sel}
	if spec.PolicyTypes == nil {
		spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
	}
	pol := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: spec}
	if _, err := n.c.Client.NetworkingV1().NetworkPolicies(n.ns).Create(n.ctx, pol, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create policy %s: %v", name, err)
	}
	t.Cleanup(func() {
		n.c.Client.NetworkingV1().NetworkPolicies(n.ns).Delete(context.Background(), name, metav1.DeleteOptions{})
	})
}

func (n *netpol) deleteAll(t *testing.T) {
	t.Helper()
	if err := n.c.Client.NetworkingV1().NetworkPolicies(n.ns).DeleteCollection(n.ctx, metav1.DeleteOptions{}, metav1.ListOptions{}); err != nil {
		t.Fatal(err)
	}
}

// expect checks that each pod of from can (or cannot) open a TCP
// connection to ip:port, allowing 10 s for the rules to follow the API.
func (n *netpol) expect(t *testing.T, from []*corev1.Pod, ip string, port int, allowed bool) {
	t.Helper()
	target := net.JoinHostPort(ip, strconv.Itoa(port))
	for _, p := range from {
		var last error
		ok := false
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
			_, last = n.c.Probe(n.ctx, p, mustV4(p), "tcp", target)
			if (last == nil) == allowed {
				ok = true
				break
			}
		}
		if !ok {
			t.Errorf("%s (%s) → %s: allowed=%v for 10 s, want %v (last: %v)", p.Name, p.Spec.NodeName, target, !allowed, allowed, last)
		}
	}
}
