package kubecluster_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	neturl "net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/internal/tstest/kubecluster"
	"github.com/tulle-net/tulle/internal/tstest/testenv"
)

// TestRealCluster installs tulle into a real cluster (etcd, kube-apiserver,
// controller-manager, scheduler; containerd + kubelet + kube-proxy nodes in
// namespaces) with `kubectl apply -k deploy/` and checks what a user would:
// the DaemonSet Ready everywhere, Nodes marked, pods on every node talking
// to each other (both families), to other nodes' hosts and through a
// Service; a rolling update of tulle under a long transfer; pod deletion
// freeing addresses; a kubelet restart; a Node's removal.
func TestRealCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("a whole cluster: not in -short")
	}
	testenv.Require(t, kubecluster.Missing())
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	start := time.Now()
	c, _ := startCluster(t, ctx, kubecluster.Options{Nodes: 3})
	t.Logf("cluster up in %s", time.Since(start).Round(time.Second))
	tag := kubecluster.RandomTag("e2e")
	// udp, not the shipped auto (host-gw here): the userspace datapath
	// is what this test measures first; BackendChange moves to auto.
	installTulle(t, ctx, c, kubecluster.Overlay{Tag: tag, NetConf: netConf(`{"Type":"udp","Port":8285}`)})
	t.Logf("tulle installed and ready on %d nodes after %s", len(c.Nodes), time.Since(start).Round(time.Second))

	t.Run("Nodes", func(t *testing.T) { checkNodes(t, ctx, c) })
	t.Run("NodeIdentity", func(t *testing.T) { checkNodeIdentity(t, ctx, c) })
	t.Run("Operate", func(t *testing.T) { checkOperate(t, ctx, c) })

	const ns, app, replicas = "default", "echo", 6
	pods := deployTestPods(t, ctx, c, ns, app, replicas)
	if out, err := c.Kubectl(ctx, "get", "pods", "-o", "wide"); err == nil {
		t.Logf("kubectl get pods -o wide:\n%s", out)
	}
	t.Run("PodAddresses", func(t *testing.T) { checkPodAddresses(t, ctx, c, pods) })
	t.Run("PodToPod", func(t *testing.T) { checkPodToPod(t, ctx, c, pods) })
	t.Run("PodToHost", func(t *testing.T) { checkPodToHost(t, ctx, c, pods) })
	t.Run("Service", func(t *testing.T) { checkService(t, ctx, c, ns, app, pods) })
	t.Run("SameNodeService", func(t *testing.T) { checkSameNodeService(t, ctx, c, ns, pods) })
	t.Run("RollingUpdate", func(t *testing.T) { checkRollingUpdate(t, ctx, c, tag, pods) })
	t.Run("PodDelete", func(t *testing.T) { checkPodDelete(t, ctx, c, ns, app, replicas) })
	t.Run("KubeletRestart", func(t *testing.T) { checkKubeletRestart(t, ctx, c, ns, app) })
	t.Run("BackendChange", func(t *testing.T) { checkBackendChange(t, ctx, c, tag, ns, app) })
	t.Run("NodeRemoval", func(t *testing.T) { checkNodeRemoval(t, ctx, c) })
	t.Run("WireGuard", func(t *testing.T) { checkWireGuard(t, ctx, c, tag, ns, app) })
}

// startCluster starts a cluster of opt (Dir, Root and Logf filled in) that
// goes away with the test, its logs printed if the test failed; it
// returns the cluster and the repository's root.
func startCluster(t *testing.T, ctx context.Context, opt kubecluster.Options) (*kubecluster.Cluster, string) {
	t.Helper()
	root, _ := filepath.Abs("../../..")
	opt.Dir, opt.Root, opt.Logf = t.TempDir(), root, t.Logf
	c, err := kubecluster.Start(ctx, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			dumpLogs(t, c, opt.Dir)
		}
		if err := c.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return c, root
}

// installTulle installs tulle through the overlay and waits until it is
// Ready on every node.
func installTulle(t *testing.T, ctx context.Context, c *kubecluster.Cluster, o kubecluster.Overlay) {
	t.Helper()
	if err := c.InstallTulle(ctx, o); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitTulle(ctx, 3*time.Minute); err != nil {
		t.Fatal(err)
	}
}

// deployTestPods runs replicas test pods (and their Service) and returns
// them once Ready.
func deployTestPods(t *testing.T, ctx context.Context, c *kubecluster.Cluster, ns, app string, replicas int) []corev1.Pod {
	t.Helper()
	if err := c.WaitServiceAccount(ctx, ns); err != nil {
		t.Fatal(err)
	}
	if err := c.DeployTestPods(ctx, ns, app, replicas); err != nil {
		t.Fatal(err)
	}
	pods, err := c.Pods(ctx, ns, "app="+app)
	if err != nil {
		t.Fatal(err)
	}
	return pods
}

func checkNodes(t *testing.T, ctx context.Context, c *kubecluster.Cluster) {
	for _, n := range c.Nodes {
		node, err := c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if ok, msg := kubecluster.NodeReady(node); !ok {
			t.Errorf("%s not Ready: %s", n.Name, msg)
		}
		var netUnavailable *corev1.NodeCondition
		for i, cd := range node.Status.Conditions {
			if cd.Type == corev1.NodeNetworkUnavailable {
				netUnavailable = &node.Status.Conditions[i]
			}
		}
		if netUnavailable == nil || netUnavailable.Status != corev1.ConditionFalse {
			t.Errorf("%s: NetworkUnavailable %+v, want False", n.Name, netUnavailable)
		}
		if got := node.Annotations["tulle.dev/public-ip"]; got != n.IP4.String() {
			t.Errorf("%s: annotation tulle.dev/public-ip %q, want %s (all: %v)", n.Name, got, n.IP4, node.Annotations)
		}
	}
}

// checkNodeIdentity: a token bound to a running tulle pod, as its kubelet
// gets it, may publish on the pod's own Node and is refused (403, the
// node identity policy) on another (dry runs: admission runs, nothing
// changes).
func checkNodeIdentity(t *testing.T, ctx context.Context, c *kubecluster.Cluster) {
	pods, err := c.Pods(ctx, kubecluster.TulleNamespace, "app.kubernetes.io/name=tulle")
	if err != nil || len(pods) < 2 {
		t.Fatalf("tulle pods: %d, %v", len(pods), err)
	}
	pod := pods[0]
	tr, err := c.Client.CoreV1().ServiceAccounts(kubecluster.TulleNamespace).CreateToken(ctx, pod.Spec.ServiceAccountName, &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cfg.BearerToken, cfg.BearerTokenFile = tr.Status.Token, ""
	as, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dry := metav1.PatchOptions{DryRun: []string{metav1.DryRunAll}}
	for _, n := range c.Nodes {
		patch := fmt.Sprintf(`{"metadata":{"annotations":{"tulle.dev/public-ip":%q}}}`, n.IP4)
		_, err := as.CoreV1().Nodes().Patch(ctx, n.Name, types.MergePatchType, []byte(patch), dry, "status")
		switch {
		case n.Name == pod.Spec.NodeName && err != nil:
			t.Errorf("tulle on %s publishing its own Node: %v", n.Name, err)
		case n.Name != pod.Spec.NodeName && (!apierrors.IsForbidden(err) || !strings.Contains(fmt.Sprint(err), "may not change Node "+n.Name)):
			t.Errorf("tulle on %s publishing Node %s: %v, want 403 from the node identity policy", pod.Spec.NodeName, n.Name, err)
		}
	}
}

// checkOperate runs what docs/operations.md tells an operator to: logs
// and tullectl status through kubectl (API server → kubelet → containerd).
func checkOperate(t *testing.T, ctx context.Context, c *kubecluster.Cluster) {
	out, err := c.Kubectl(ctx, "-n", kubecluster.TulleNamespace, "logs", "ds/tulle", "-c", "tulled")
	if err != nil || !strings.Contains(out, `"msg":"tulled forwarding"`) {
		t.Errorf("kubectl logs ds/tulle: %v\n%s", err, out)
	}
	pods, err := c.Pods(ctx, kubecluster.TulleNamespace, "app.kubernetes.io/name=tulle")
	if err != nil || len(pods) == 0 {
		t.Fatalf("tulle pods: %v", err)
	}
	out, err = c.Kubectl(ctx, "-n", kubecluster.TulleNamespace, "exec", pods[0].Name, "-c", "tulled", "--", "tullectl", "status")
	if err != nil {
		t.Fatalf("kubectl exec … tullectl status: %v", err)
	}
	for _, n := range c.Nodes {
		if n.Name != pods[0].Spec.NodeName && !strings.Contains(out, n.IP4.String()+":8285") {
			t.Errorf("tullectl status on %s lacks peer %s (%s):\n%s", pods[0].Spec.NodeName, n.Name, n.IP4, out)
		}
	}
	if !strings.Contains(out, "ready") {
		t.Errorf("tullectl status says nothing of readiness:\n%s", out)
	}
}

func checkPodAddresses(t *testing.T, ctx context.Context, c *kubecluster.Cluster, pods []corev1.Pod) {
	perNode := map[string]int{}
	for _, p := range pods {
		perNode[p.Spec.NodeName]++
		node, err := c.Client.CoreV1().Nodes().Get(ctx, p.Spec.NodeName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		v4, v6 := kubecluster.PodIPs(&p)
		for _, ip := range []string{v4, v6} {
			a, err := netip.ParseAddr(ip)
			if err != nil {
				t.Errorf("pod %s: address %q (all: %v)", p.Name, ip, p.Status.PodIPs)
				continue
			}
			in := false
			for _, cidr := range node.Spec.PodCIDRs {
				if pf, err := netip.ParsePrefix(cidr); err == nil && pf.Contains(a) {
					in = true
				}
			}
			if !in {
				t.Errorf("pod %s on %s: %s not in the node's pod CIDRs %v", p.Name, p.Spec.NodeName, a, node.Spec.PodCIDRs)
			}
		}
	}
	for _, n := range c.Nodes {
		if perNode[n.Name] == 0 {
			t.Errorf("no test pod on %s: %v", n.Name, perNode)
		}
	}
}

// checkPodToPod: every pod reaches every other pod's server, over IPv4 and
// IPv6, seen from its own address.
func checkPodToPod(t *testing.T, ctx context.Context, c *kubecluster.Cluster, pods []corev1.Pod) {
	for i := range pods {
		for j := range pods {
			if i == j {
				continue
			}
			for _, fam := range []int{4, 6} {
				if err := c.Reach(ctx, &pods[i], &pods[j], fam); err != nil {
					t.Error(err)
				}
			}
		}
	}
}

// checkPodToHost: every pod reaches the other nodes' hosts (ICMP both
// families, TCP to kubelet's port).
func checkPodToHost(t *testing.T, ctx context.Context, c *kubecluster.Cluster, pods []corev1.Pod) {
	for i := range pods {
		from := &pods[i]
		fv4, _ := kubecluster.PodIPs(from)
		for _, n := range c.Nodes {
			if n.Name == from.Spec.NodeName {
				continue
			}
			for _, probe := range [][2]string{
				{"ping", n.IP4.String()},
				{"ping", n.IP6.String()},
				{"tcp", net.JoinHostPort(n.IP4.String(), "10250")},
			} {
				if _, err := c.Probe(ctx, from, fv4, probe[0], probe[1]); err != nil {
					t.Errorf("%s (%s) → host %s %s %s: %v", from.Name, from.Spec.NodeName, n.Name, probe[0], probe[1], err)
				}
			}
		}
	}
}

// checkService: from each pod, the ClusterIP Service answers, also from
// endpoints on other nodes (kube-proxy's DNAT, then tulle).
func checkService(t *testing.T, ctx context.Context, c *kubecluster.Cluster, ns, app string, pods []corev1.Pod) {
	svc, err := c.Client.CoreV1().Services(ns).Get(ctx, app, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range pods {
		if _, err := c.ViaService(ctx, &pods[i], svc.Spec.ClusterIP); err != nil {
			t.Error(err)
		}
	}
}

// checkRollingUpdate changes the DaemonSet's pod template (an env var) and
// waits for the rollout, while one pod streams 48 MB from a pod on another
// node at 2 MB/s and every pod keeps probing the pods on other nodes: the
// transfer arrives intact, and no probe fails unless one of its two nodes
// was without a Ready tulled at the time (tulled is that node's datapath;
// a restart keeps routes and devices, so the gap is the restart itself).
// checkSameNodeService: a pod reaches, through a Service's ClusterIP, an
// endpoint on its own node — the reply crosses only tulle's bridge, and
// must still pass kube-proxy's reverse NAT — with the node namespace's
// net.bridge.bridge-nf-call-iptables/ip6tables off (as some distributions
// ship them): the bridge's own nf_call flags, which the CNI plugin sets,
// carry it. With those turned off too, the same probe fails: what the
// check relies on is really in play.
func checkSameNodeService(t *testing.T, ctx context.Context, c *kubecluster.Cluster, ns string, pods []corev1.Pod) {
	var from, to *corev1.Pod
	for i := range pods {
		for j := range pods {
			if i != j && pods[i].Spec.NodeName == pods[j].Spec.NodeName {
				from, to = &pods[i], &pods[j]
			}
		}
	}
	if from == nil {
		t.Fatal("no two test pods share a node")
	}
	node := c.Node(from.Spec.NodeName)
	name := kubecluster.RandomTag("hairpin")
	if _, err := c.Kubectl(ctx, "-n", ns, "label", "pod", to.Name, "hairpin="+name); err != nil {
		t.Fatal(err)
	}
	svc, err := c.Client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"hairpin": name},
			Ports: []corev1.ServicePort{{Port: kubecluster.ServicePort, TargetPort: intstr.FromInt32(kubecluster.TestPodPort)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Client.CoreV1().Services(ns).Delete(context.Background(), name, metav1.DeleteOptions{}) })
	sysctl := func(v string) {
		t.Helper()
		out, err := exec.Command("ip", "netns", "exec", node.NS, "sysctl", "-qw",
			"net.bridge.bridge-nf-call-iptables="+v, "net.bridge.bridge-nf-call-ip6tables="+v).CombinedOutput()
		if err != nil {
			t.Fatalf("sysctl in %s: %v: %s", node.NS, err, out)
		}
	}
	bridge := func(v string) {
		t.Helper()
		out, err := exec.Command("ip", "-n", node.NS, "link", "set", "tulle-br0", "type", "bridge", "nf_call_iptables", v, "nf_call_ip6tables", v).CombinedOutput()
		if err != nil {
			t.Fatalf("bridge flags in %s: %v: %s", node.NS, err, out)
		}
	}
	sysctl("0")
	t.Cleanup(func() { sysctl("1"); bridge("1") })
	target := net.JoinHostPort(svc.Spec.ClusterIP, fmt.Sprint(kubecluster.ServicePort))
	fv4, _ := kubecluster.PodIPs(from)
	// answered reports whether to answered through the Service within d.
	answered := func(d time.Duration) (bool, string) {
		var last string
		for deadline := time.Now().Add(d); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
			pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			out, err := c.Probe(pctx, from, fv4, "http", target)
			cancel()
			var a kubecluster.Answer
			if err == nil && json.Unmarshal([]byte(out), &a) == nil && a.Hostname == to.Name {
				return true, ""
			}
			last = fmt.Sprint(out, err)
		}
		return false, last
	}
	if ok, last := answered(30 * time.Second); !ok {
		t.Fatalf("%s → service %s → %s, both on %s, bridge-nf-call-iptables=0: no answer in 30 s (last: %s)", from.Name, target, to.Name, node.Name, last)
	}
	bridge("0")
	if ok, _ := answered(5 * time.Second); ok {
		t.Errorf("%s → service %s → %s answered with the bridge's nf_call flags off too: the check does not test what it says", from.Name, target, to.Name)
	}
	bridge("1")
	if ok, last := answered(30 * time.Second); !ok {
		t.Errorf("no answer after the bridge's flags came back (last: %s)", last)
	}
}

func checkRollingUpdate(t *testing.T, ctx context.Context, c *kubecluster.Cluster, tag string, pods []corev1.Pod) {
	src, dst := &pods[0], remotePod(pods, &pods[0])
	if dst == nil {
		t.Fatal("no pod pair across nodes")
	}
	const size, rate = 48 << 20, 2 << 20
	sv4, _ := kubecluster.PodIPs(src)
	dv4, _ := kubecluster.PodIPs(dst)
	done := make(chan error, 1)
	var got string
	go func() {
		url := fmt.Sprintf("http://%s/stream?bytes=%d&rate=%d", net.JoinHostPort(dv4, fmt.Sprint(kubecluster.TestPodPort)), size, rate)
		var err error
		got, err = c.PodGet(ctx, src, sv4, "/fetch?url="+neturl.QueryEscape(url))
		done <- err
	}()
	wctx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	down := c.WatchTulle(wctx)
	// A datagram every 10 ms from src to dst's UDP echo and back, over the
	// whole rollout: the longest silence is what a tulled restart costs
	// the pods on its node.
	watched := watchUDP(ctx, c, src, dst, 40*time.Second)
	time.Sleep(2 * time.Second)
	rollStart := time.Now()
	if err := c.ApplyTulle(ctx, kubecluster.Overlay{Tag: tag, Patch: rolloutPatch}); err != nil {
		t.Fatal(err)
	}
	type failure struct {
		from, to   *corev1.Pod
		start, end time.Time
		err        error
	}
	var failures []failure
	probes := 0
	for {
		for i := range pods {
			for j := range pods {
				from, to := &pods[i], &pods[j]
				if from.Spec.NodeName == to.Spec.NodeName {
					continue
				}
				probes++
				start := time.Now()
				if err := c.Reach(ctx, from, to, 4); err != nil {
					failures = append(failures, failure{from, to, start, time.Now(), err})
				}
			}
		}
		if err := c.WaitTulle(ctx, time.Millisecond); err == nil && time.Since(rollStart) > 5*time.Second {
			break
		}
		if time.Since(rollStart) > 4*time.Minute {
			t.Fatal("rollout not done in 4 minutes")
		}
	}
	stopWatch()
	excused := 0
	for _, f := range failures {
		if down.Overlaps(f.from.Spec.NodeName, f.start, f.end, time.Second) || down.Overlaps(f.to.Spec.NodeName, f.start, f.end, time.Second) {
			excused++
			continue
		}
		t.Errorf("during the rollout, with tulle Ready on both nodes: %v", f.err)
	}
	for _, n := range c.Nodes {
		var spans []string
		for _, iv := range down.Down(n.Name) {
			spans = append(spans, iv.End.Sub(iv.Start).Round(100*time.Millisecond).String())
		}
		t.Logf("%s: without a Ready tulled for %v", n.Name, spans)
		if len(spans) == 0 {
			t.Errorf("%s: its tulle pod was never replaced", n.Name)
		}
	}
	t.Logf("rollout done in %s; %d cross-node probes, %d failed while one end's tulled restarted, %d otherwise",
		time.Since(rollStart).Round(time.Second), probes, excused, len(failures)-excused)
	ds, err := c.Client.AppsV1().DaemonSets(kubecluster.TulleNamespace).Get(ctx, kubecluster.TulleDaemonSet, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rolled := false
	for _, e := range ds.Spec.Template.Spec.Containers[0].Env {
		rolled = rolled || e.Name == "TULLE_E2E_ROLLOUT"
	}
	if !rolled {
		t.Errorf("the DaemonSet's template lacks the new env var")
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("transfer across the rollout: %v", err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("transfer across the rollout did not end")
	}
	var res struct {
		Bytes  int64
		SHA256 string
	}
	json.Unmarshal([]byte(got), &res)
	h := sha256.New()
	buf := make([]byte, size)
	for i := range buf {
		buf[i] = byte(i % 251)
	}
	h.Write(buf)
	if want := hex.EncodeToString(h.Sum(nil)); res.Bytes != size || res.SHA256 != want {
		t.Errorf("transfer across the rollout: %d bytes sha256 %s, want %d bytes %s", res.Bytes, res.SHA256, size, want)
	}
	t.Logf("%d MB streamed %s → %s across the rollout, intact", size>>20, dst.Spec.NodeName, src.Spec.NodeName)
	w := <-watched
	if w.err != nil || w.Received == 0 {
		t.Fatalf("UDP echo %s ↔ %s over the rollout: %+v %v", src.Spec.NodeName, dst.Spec.NodeName, w.Silence, w.err)
	}
	t.Logf("UDP echo every 10 ms %s ↔ %s for 40 s across the rollout: %d of %d answered, longest silence %d ms",
		src.Spec.NodeName, dst.Spec.NodeName, w.Received, w.Sent, w.LongestGapMs)
}

type watchResult struct {
	kubecluster.Silence
	err error
}

// watchUDP starts a UDP echo watch from src to dst for d; its result
// arrives on the channel.
func watchUDP(ctx context.Context, c *kubecluster.Cluster, src, dst *corev1.Pod, d time.Duration) <-chan watchResult {
	ch := make(chan watchResult, 1)
	go func() {
		s, err := c.UDPWatch(ctx, src, dst, d)
		ch <- watchResult{s, err}
	}()
	return ch
}

// rolloutPatch changes the DaemonSet's pod template: a rollout.
const rolloutPatch = "- op: add\n  path: /spec/template/spec/containers/0/env/-\n  value: {name: TULLE_E2E_ROLLOUT, value: \"1\"}\n"

// checkBackendChange does what docs/operations.md says to change the
// backend: a new net-conf.json in the ConfigMap (an overlay), then
// `kubectl rollout restart`. With Backend.Type auto on one L2 segment,
// every peer goes host-gw: kernel routes to each node's pod subnets via
// its underlay address, and the pods still talk, both families.
func checkBackendChange(t *testing.T, ctx context.Context, c *kubecluster.Cluster, tag, ns, app string) {
	switchBackend(t, ctx, c, tag, `{"Type":"auto","Port":8285}`)
	for _, n := range c.Nodes {
		waitPeersBackend(t, ctx, n, "host-gw", len(c.Nodes)-1)
		for _, o := range c.Nodes {
			if o == n {
				continue
			}
			node, err := c.Client.CoreV1().Nodes().Get(ctx, o.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			// The underlay is IPv4 alone (no --public-ipv6 in the
			// DaemonSet): the IPv6 pod subnets stay on the udp path.
			for _, cidr := range node.Spec.PodCIDRs {
				if strings.Contains(cidr, ":") {
					continue
				}
				if r := routes(t, n, cidr); !strings.Contains(r, "via "+o.IP4.String()) {
					t.Errorf("%s: route to %s's %s %q, want via %s", n.Name, o.Name, cidr, r, o.IP4)
				}
			}
		}
	}
	pods, err := c.Pods(ctx, ns, "app="+app)
	if err != nil {
		t.Fatal(err)
	}
	checkPodToPod(t, ctx, c, pods)

	// host-gw keeps its routes in the kernel: a rollout costs the IPv4
	// path between pods nothing.
	src, dst := &pods[0], remotePod(pods, &pods[0])
	watched := watchUDP(ctx, c, src, dst, 25*time.Second)
	time.Sleep(time.Second)
	if _, err := c.Kubectl(ctx, "-n", kubecluster.TulleNamespace, "rollout", "restart", "daemonset/tulle"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	if _, err := c.Kubectl(ctx, "-n", kubecluster.TulleNamespace, "rollout", "status", "daemonset/tulle", "--timeout=4m"); err != nil {
		t.Fatal(err)
	}
	w := <-watched
	if w.err != nil || w.Received == 0 {
		t.Fatalf("UDP echo %s ↔ %s over the host-gw rollout: %+v %v", src.Spec.NodeName, dst.Spec.NodeName, w.Silence, w.err)
	}
	t.Logf("host-gw: UDP echo every 10 ms %s ↔ %s for 25 s across a rollout: %d of %d answered, longest silence %d ms",
		src.Spec.NodeName, dst.Spec.NodeName, w.Received, w.Sent, w.LongestGapMs)
	if w.LongestGapMs > 1000 {
		t.Errorf("host-gw: %d ms without an answer across a rollout; the kernel's routes should carry on", w.LongestGapMs)
	}
}

// switchBackend applies net-conf.json with backend in an overlay and
// restarts the DaemonSet, as docs/operations.md says to.
// netConf is the shipped network with backend (a Backend JSON object).
func netConf(backend string) string {
	return `{"Network":"100.96.0.0/12","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:96::/56","IPv6SubnetLen":64,"Backend":` + backend + `}`
}

func switchBackend(t *testing.T, ctx context.Context, c *kubecluster.Cluster, tag, backend string) {
	t.Helper()
	if err := c.ApplyTulle(ctx, kubecluster.Overlay{Tag: tag, Patch: rolloutPatch, NetConf: netConf(backend)}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Kubectl(ctx, "-n", kubecluster.TulleNamespace, "rollout", "restart", "daemonset/tulle"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	if _, err := c.Kubectl(ctx, "-n", kubecluster.TulleNamespace, "rollout", "status", "daemonset/tulle", "--timeout=4m"); err != nil {
		t.Fatal(err)
	}
}

// waitPeersBackend waits until node n's tulled serves want peers, all with
// backend.
func waitPeersBackend(t *testing.T, ctx context.Context, n *kubecluster.Node, backend string, want int) []api.Peer {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		s, err := n.TulleStatus(ctx)
		if err != nil {
			t.Fatalf("%s: status: %v", n.Name, err)
		}
		k := 0
		for _, p := range s.Peers {
			if p.Backend == backend {
				k++
			}
		}
		if k == want && len(s.Peers) == want {
			return s.Peers
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: peers %+v, want %d, all %s", n.Name, s.Peers, want, backend)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// checkWireGuard switches the (now two-node) cluster to WireGuard: each
// tulled makes its key in the node's /var/lib/tulle (0600), every peer is
// served over WireGuard with a handshake done, and the pods talk (both
// families) through it.
func checkWireGuard(t *testing.T, ctx context.Context, c *kubecluster.Cluster, tag, ns, app string) {
	nodes := c.Nodes[:len(c.Nodes)-1] // NodeRemoval took the last
	switchBackend(t, ctx, c, tag, `{"Type":"wireguard","Port":51820,"Mode":"auto"}`)
	for _, n := range nodes {
		fi, err := os.Stat(n.Host("/var/lib/tulle/wireguard.key"))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: the WireGuard key in the node's /var/lib/tulle: %v %v", n.Name, fi, err)
		}
		waitPeersBackend(t, ctx, n, "wireguard", len(nodes)-1)
	}
	// The pods of the removed node stay listed until the pod GC removes
	// them: talk among the others.
	all, err := c.Pods(ctx, ns, "app="+app)
	if err != nil {
		t.Fatal(err)
	}
	var pods []corev1.Pod
	for _, p := range all {
		if p.Spec.NodeName != c.Nodes[len(c.Nodes)-1].Name {
			pods = append(pods, p)
		}
	}
	checkPodToPod(t, ctx, c, pods)
	for _, n := range nodes {
		for _, p := range waitPeersBackend(t, ctx, n, "wireguard", len(nodes)-1) {
			if p.WireGuard == nil || p.WireGuard.LastHandshake.IsZero() {
				t.Errorf("%s: peer %s has no WireGuard handshake after pods talked: %+v", n.Name, p.Name, p.WireGuard)
			}
		}
	}
}

// remotePod is a pod on another node than p's.
func remotePod(pods []corev1.Pod, p *corev1.Pod) *corev1.Pod {
	for i := range pods {
		if pods[i].Spec.NodeName != p.Spec.NodeName {
			return &pods[i]
		}
	}
	return nil
}

// allocations counts the addresses tulle's CNI plugin holds on node n.
func allocations(t *testing.T, n *kubecluster.Node) int {
	ents, err := os.ReadDir(n.Host("/var/lib/cni/tulle/tulle"))
	if err != nil {
		t.Fatal(err)
	}
	k := 0
	for _, e := range ents {
		if _, err := netip.ParseAddr(e.Name()); err == nil {
			k++
		}
	}
	return k
}

// checkPodDelete deletes a test pod: CNI DEL frees both its addresses on
// its node; its replacement gets addresses and answers.
func checkPodDelete(t *testing.T, ctx context.Context, c *kubecluster.Cluster, ns, app string, replicas int) {
	pods, err := c.Pods(ctx, ns, "app="+app)
	if err != nil {
		t.Fatal(err)
	}
	victim := pods[0]
	n := c.Node(victim.Spec.NodeName)
	before := allocations(t, n)
	grace := int64(0)
	if err := c.Client.CoreV1().Pods(ns).Delete(ctx, victim.Name, metav1.DeleteOptions{GracePeriodSeconds: &grace}); err != nil {
		t.Fatal(err)
	}
	// The Deployment replaces it at once, maybe on the same node: count
	// the victim's own addresses instead of the total.
	v4, v6 := kubecluster.PodIPs(&victim)
	deadline := time.Now().Add(60 * time.Second)
	for {
		held := 0
		for _, ip := range []string{v4, v6} {
			if _, err := os.Stat(filepath.Join(n.Host("/var/lib/cni/tulle/tulle"), ip)); err == nil {
				held++
			}
		}
		if held == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pod %s deleted 60 s ago: %s still holds %d of its addresses %s %s", victim.Name, n.Name, held, v4, v6)
		}
		time.Sleep(250 * time.Millisecond)
	}
	if err := c.WaitPods(ctx, ns, app, replicas, 90*time.Second); err != nil {
		t.Fatal(err)
	}
	pods, _ = c.Pods(ctx, ns, "app="+app)
	if after := allocations(t, n); after > before {
		t.Errorf("%s holds %d addresses after the delete and the replacement, %d before", n.Name, after, before)
	}
	t.Logf("%s: %d addresses before the delete, %d after it and the replacement", n.Name, before, allocations(t, n))
	for i := range pods {
		if pods[i].Name == victim.Name {
			t.Errorf("deleted pod %s still listed", victim.Name)
		}
	}
	checkPodToPod(t, ctx, c, pods)
}

// checkKubeletRestart restarts one node's kubelet: its pods keep their
// addresses and connectivity, the allocations stay, and a new pod on that
// node gets an address.
func checkKubeletRestart(t *testing.T, ctx context.Context, c *kubecluster.Cluster, ns, app string) {
	n := c.Nodes[0]
	before := allocations(t, n)
	podsBefore, _ := c.Pods(ctx, ns, "app="+app)
	n.StopKubelet()
	if err := n.StartKubelet(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(90 * time.Second)
	for {
		node, err := c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err == nil {
			if ok, _ := kubecluster.NodeReady(node); ok && node.Status.Conditions != nil {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not Ready 90 s after its kubelet restarted", n.Name)
		}
		time.Sleep(250 * time.Millisecond)
	}
	time.Sleep(3 * time.Second) // the kubelet's first sync of its pods
	if after := allocations(t, n); after != before {
		t.Errorf("%s: %d addresses allocated after the kubelet restart, %d before", n.Name, after, before)
	}
	pods, _ := c.Pods(ctx, ns, "app="+app)
	for _, p := range podsBefore {
		for _, q := range pods {
			if p.Name == q.Name && fmt.Sprint(p.Status.PodIPs) != fmt.Sprint(q.Status.PodIPs) {
				t.Errorf("pod %s: addresses %v after the kubelet restart, %v before", p.Name, q.Status.PodIPs, p.Status.PodIPs)
			}
		}
	}
	checkPodToPod(t, ctx, c, pods)
}

// checkNodeRemoval deletes the last node's Node object: the other nodes'
// tulled drop it as a peer (with its subnets: no route to them through the
// datapath) and traffic to its pods stops at the sender.
func checkNodeRemoval(t *testing.T, ctx context.Context, c *kubecluster.Cluster) {
	gone := c.Nodes[len(c.Nodes)-1]
	rest := c.Nodes[:len(c.Nodes)-1]
	node, err := c.Client.CoreV1().Nodes().Get(ctx, gone.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range rest {
		if subnets := peerSubnets(t, ctx, n, gone.Name); len(subnets) != len(node.Spec.PodCIDRs) {
			t.Fatalf("%s: peer %s has subnets %v before the removal, want its pod CIDRs %v", n.Name, gone.Name, subnets, node.Spec.PodCIDRs)
		}
	}
	// A removed node is one whose kubelet is gone too (else it registers
	// again at once).
	gone.StopKubelet()
	if err := c.Client.CoreV1().Nodes().Delete(ctx, gone.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for _, n := range rest {
		for peerSubnets(t, ctx, n, gone.Name) != nil {
			if time.Since(start) > 60*time.Second {
				t.Fatalf("%s still has peer %s 60 s after its Node was deleted", n.Name, gone.Name)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	t.Logf("Node %s deleted: gone from every other node's peers within %s", gone.Name, time.Since(start).Round(100*time.Millisecond))
	// Its kernel routes (host-gw since BackendChange) leave as well.
	for _, n := range rest {
		for _, cidr := range node.Spec.PodCIDRs {
			for out := routes(t, n, cidr); strings.Contains(out, gone.IP4.String()); out = routes(t, n, cidr) {
				if time.Since(start) > 60*time.Second {
					t.Fatalf("%s still routes %s via %s 60 s after its Node was deleted: %s", n.Name, cidr, gone.Name, out)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
	}
	t.Logf("and its kernel routes from every other node within %s", time.Since(start).Round(100*time.Millisecond))
}

// peerSubnets returns the subnets node n's tulled has for peer name, nil
// when it has no such peer.
func peerSubnets(t *testing.T, ctx context.Context, n *kubecluster.Node, name string) []netip.Prefix {
	s, err := n.TulleStatus(ctx)
	if err != nil {
		t.Fatalf("%s: tulled status: %v", n.Name, err)
	}
	for _, p := range s.Peers {
		if p.Name == name {
			return append([]netip.Prefix{}, p.Subnets...)
		}
	}
	return nil
}

func routes(t *testing.T, n *kubecluster.Node, cidr string) string {
	fam := "-4"
	if strings.Contains(cidr, ":") {
		fam = "-6"
	}
	out, err := exec.Command("ip", "-n", n.NS, fam, "route", "show", "match", cidr).CombinedOutput()
	if err != nil {
		t.Fatalf("ip route: %v: %s", err, out)
	}
	return strings.TrimSpace(string(out))
}

// dumpLogs prints the tails of every component's log.
func dumpLogs(t *testing.T, c *kubecluster.Cluster, dir string) {
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(p, ".log") {
			return nil
		}
		b, _ := os.ReadFile(p)
		if len(b) > 4000 {
			b = b[len(b)-4000:]
		}
		t.Logf("--- %s:\n%s", strings.TrimPrefix(p, dir), b)
		return nil
	})
}

// TestRealClusterContainerd2 installs tulle on nodes that run containerd 2
// with current CNI plugins, the conflist raised to cniVersion 1.1.0 in an
// overlay (as docs/operations.md says such clusters may): pods talk across
// nodes, and the runtime asks tulle's STATUS — while a node's tulled does
// not answer the Node is NotReady with tulle's reason, and Ready once it
// does again.
func TestRealClusterContainerd2(t *testing.T) {
	if testing.Short() {
		t.Skip("a whole cluster: not in -short")
	}
	rt := kubecluster.Containerd2()
	testenv.Require(t, kubecluster.MissingFor(rt))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c, root := startCluster(t, ctx, kubecluster.Options{Nodes: 2, Runtime: rt})
	conflist, err := os.ReadFile(filepath.Join(root, "deploy", "10-tulle.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	cni11 := strings.Replace(string(conflist), `"cniVersion": "1.0.0"`, `"cniVersion": "1.1.0"`, 1)
	if cni11 == string(conflist) {
		t.Fatalf("deploy/10-tulle.conflist has no cniVersion 1.0.0 to raise:\n%s", conflist)
	}
	installTulle(t, ctx, c, kubecluster.Overlay{Tag: kubecluster.RandomTag("e2e"), Conflist: cni11})
	checkNodes(t, ctx, c)
	const ns, app = "default", "echo"
	pods := deployTestPods(t, ctx, c, ns, app, 4)
	checkPodAddresses(t, ctx, c, pods)
	checkPodToPod(t, ctx, c, pods)

	// STATUS: tulled hangs on n1 (SIGSTOP: its socket stops answering) →
	// the plugin answers 51, containerd reports the network not ready and
	// kubelet marks the Node NotReady with tulle's words; SIGCONT → Ready.
	// (A kill would race the kubelet's restart against its 5 s status poll.)
	n := c.Nodes[0]
	pid := tulledPID(t, n)
	stopped := time.Now()
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGCONT) })
	msg := waitNodeReady(t, ctx, c, n.Name, false, 25*time.Second)
	t.Logf("%s NotReady %s after its tulled hung: %s", n.Name, time.Since(stopped).Round(100*time.Millisecond), msg)
	if !strings.Contains(msg, "tulled is not running") {
		t.Errorf("%s NotReady for %q, want tulle's STATUS reason", n.Name, msg)
	}
	resumed := time.Now()
	if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	waitNodeReady(t, ctx, c, n.Name, true, 60*time.Second)
	t.Logf("%s Ready again %s after tulled resumed", n.Name, time.Since(resumed).Round(100*time.Millisecond))
	checkPodToPod(t, ctx, c, pods)

	// A kubelet restart asks the runtime's status (STATUS) at once: with
	// tulled up, nothing changes.
	checkKubeletRestart(t, ctx, c, ns, app)
}

// tulledPID finds the tulled process among node n's pods.
func tulledPID(t *testing.T, n *kubecluster.Node) int {
	t.Helper()
	var pid int
	filepath.WalkDir(filepath.Join("/sys/fs/cgroup/pids", n.CgroupRoot, "kubepods"), func(p string, d os.DirEntry, err error) error {
		if err != nil || d.Name() != "cgroup.procs" {
			return nil
		}
		b, _ := os.ReadFile(p)
		for _, f := range strings.Fields(string(b)) {
			if comm, _ := os.ReadFile("/proc/" + f + "/comm"); strings.TrimSpace(string(comm)) == "tulled" {
				fmt.Sscan(f, &pid)
			}
		}
		return nil
	})
	if pid == 0 {
		t.Fatalf("%s: no tulled process in its pods' cgroups", n.Name)
	}
	return pid
}

// waitNodeReady waits until the Node's Ready condition is want and returns
// its message.
func waitNodeReady(t *testing.T, ctx context.Context, c *kubecluster.Cluster, name string, want bool, d time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		node, err := c.Client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err == nil {
			if ok, msg := kubecluster.NodeReady(node); ok == want {
				return msg
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: Ready is not %v after %s", name, want, d)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
