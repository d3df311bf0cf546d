package bench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/internal/tstest/cluster"
	"github.com/tulle-net/tulle/internal/tstest/kubetest"
	"github.com/tulle-net/tulle/internal/tstest/topo"
)

// realisticNode builds a Node about the size a kubelet reports: labels,
// annotations, addresses, conditions, capacity, node info and 25 images.
func realisticNode(i int, cidr string) (*corev1.Node, corev1.NodeStatus) {
	name := fmt.Sprintf("node-%05d", i)
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
			"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
			"node.kubernetes.io/instance-type": "m6i.2xlarge", "topology.kubernetes.io/region": "region-1",
			"topology.kubernetes.io/zone": "region-1" + string(rune('a'+i%3)), "node-role.example.com/worker": "",
		}, Annotations: map[string]string{
			"node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/controller-managed-attach-detach": "true",
			"tulle.dev/backend-type": "udp", "tulle.dev/backend-data": `{"port":8285}`,
			"tulle.dev/public-ip": fmt.Sprintf("198.18.%d.%d", 1+i/250, 1+i%250),
		}},
		Spec: corev1.NodeSpec{PodCIDR: cidr, PodCIDRs: []string{cidr}, ProviderID: "example://region-1/" + name},
	}
	st := corev1.NodeStatus{
		Capacity:    corev1.ResourceList{"cpu": resource.MustParse("8"), "memory": resource.MustParse("32Gi"), "pods": resource.MustParse("110")},
		Allocatable: corev1.ResourceList{"cpu": resource.MustParse("7900m"), "memory": resource.MustParse("31Gi"), "pods": resource.MustParse("110")},
		Addresses:   []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: fmt.Sprintf("198.18.%d.%d", 1+i/250, 1+i%250)}, {Type: corev1.NodeHostName, Address: name}},
		NodeInfo: corev1.NodeSystemInfo{MachineID: strings.Repeat("a", 32), SystemUUID: strings.Repeat("b", 36), BootID: strings.Repeat("c", 36),
			KernelVersion: "6.1.0-18-amd64", OSImage: "Debian GNU/Linux 12 (bookworm)", ContainerRuntimeVersion: "containerd://1.7.13",
			KubeletVersion: "v1.34.4", OperatingSystem: "linux", Architecture: "amd64"},
	}
	for _, c := range []corev1.NodeConditionType{corev1.NodeMemoryPressure, corev1.NodeDiskPressure, corev1.NodePIDPressure, corev1.NodeReady} {
		st.Conditions = append(st.Conditions, corev1.NodeCondition{Type: c, Status: corev1.ConditionFalse, Reason: "KubeletHasSufficient" + string(c),
			Message: "kubelet has sufficient resources available", LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now()})
	}
	for k := range 25 {
		st.Images = append(st.Images, corev1.ContainerImage{Names: []string{
			fmt.Sprintf("registry.example.com/team-%d/service-%d@sha256:%064d", k%5, k, k),
			fmt.Sprintf("registry.example.com/team-%d/service-%d:v1.%d.%d", k%5, k, k, i%7)}, SizeBytes: int64(50_000_000 + k*1_000_000)})
	}
	return n, st
}

func createNodes(b *testing.B, c kubernetes.Interface, nc *netconf.Config, count int) int {
	ctx := context.Background()
	work := make(chan int)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	size := 0
	for range 32 {
		wg.Go(func() {
			for i := range work {
				cidr := netconf.SubnetAt(nc.SubnetMin, nc.SubnetLen, i+1).String()
				n, st := realisticNode(i, cidr)
				created, err := c.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{})
				if err == nil {
					created.Status = st
					created, err = c.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{})
				}
				mu.Lock()
				if err != nil && firstErr == nil {
					firstErr = err
				}
				if i == 0 && err == nil {
					raw, _ := created.Marshal()
					size = len(raw)
				}
				mu.Unlock()
			}
		})
	}
	for i := range count {
		work <- i
	}
	close(work)
	wg.Wait()
	if firstErr != nil {
		b.Fatal(firstErr)
	}
	return size
}

// BenchmarkKubePeers measures how long a tulled (podcidr mode, in a network
// namespace) takes from start until its peer table holds every one of
// KUBE_NODES Nodes (default 5000) of realistic size in a real API server,
// and its memory then. Run with: make bench-kube.
func BenchmarkKubePeers(b *testing.B) {
	if why := topo.Require(); why != "" {
		b.Skip(why)
	}
	if why := kubetest.Missing(); why != "" {
		b.Skip("needs " + why)
	}
	tulled := os.Getenv("TULLED")
	if tulled == "" {
		b.Skip("set TULLED to a tulled binary (make bench-kube does)")
	}
	count := 5000
	if v, err := strconv.Atoi(os.Getenv("KUBE_NODES")); err == nil && v > 0 {
		count = v
	}
	const netConf = `{"Network":"100.64.0.0/10","SubnetLen":24,"Backend":{"Type":"udp","Port":8285}}`
	nc, _ := netconf.Parse([]byte(netConf))
	for b.Loop() {
		kc, err := kubetest.Start(b.TempDir())
		if err != nil {
			b.Fatal(err)
		}
		defer kc.Stop()
		admin, _ := kc.Client(kubetest.AdminToken)
		start := time.Now()
		size := createNodes(b, admin, nc, count)
		b.Logf("created %d Nodes of %d bytes each (as stored, protobuf) in %v", count, size, time.Since(start).Round(time.Millisecond))

		self := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"}, Spec: corev1.NodeSpec{PodCIDRs: []string{netconf.SubnetAt(nc.SubnetMin, nc.SubnetLen, count+1).String()}}}
		if _, err := admin.CoreV1().Nodes().Create(context.Background(), self, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		kcfg, err := kc.Kubeconfig(kubetest.AdminToken)
		if err != nil {
			b.Fatal(err)
		}
		cl, err := cluster.Build(topo.Options{Nodes: 1, Prefix: "tullekbench"}, cluster.Options{Tulled: tulled, Dir: b.TempDir(), NetConf: netConf,
			Args: []string{"--lease-store", "kube", "--kubeconfig", kcfg}})
		if err != nil {
			b.Fatal(err)
		}
		stopFwd, err := kc.ForwardInto(cl.Topo.Nodes[0].NS, topo.DoIn)
		if err != nil {
			cl.Close()
			b.Fatal(err)
		}
		defer stopFwd() // after cl.Close: tulled cleanup needs the API
		defer cl.Close()
		n := cl.Nodes[0]
		t0 := time.Now()
		if err := n.Start(); err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		if err := n.WaitPeers(ctx, count); err != nil {
			b.Fatal(err)
		}
		elapsed := time.Since(t0)
		rss, hwm := cluster.ProcStatusKB(n.PID(), "VmRSS:"), cluster.ProcStatusKB(n.PID(), "VmHWM:")
		b.Logf("tulled: %d peers %v after start; RSS %.1f MiB, peak %.1f MiB", count, elapsed.Round(time.Millisecond), rss/1024, hwm/1024)
		if p := os.Getenv("KUBE_HEAP_PROFILE"); p != "" {
			out, _ := exec.Command("curl", "-s", "-o", p, "--unix-socket", filepath.Join(n.RunDir, "tulled.sock"), "http://x/debug/pprof/heap").CombinedOutput()
			b.Log("heap profile:", p, string(out))
		}
		b.ReportMetric(elapsed.Seconds(), "s-to-all-peers")
		b.ReportMetric(hwm/1024, "MiB-peak-RSS")
		b.ReportMetric(rss/1024, "MiB-RSS")
	}
}
