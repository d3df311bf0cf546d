// Package kubecluster runs a real Kubernetes cluster on one machine, for
// the end-to-end tests and `tullectl demo --kube`: the cluster tulle is
// installed into the way a user installs it (kubectl apply -k deploy/).
//
// Every machine is a network namespace on one topo underlay
// (198.18.0.0/24, fd00:198::/64):
//
//   - the control plane (the last namespace): etcd, kube-apiserver on
//     its underlay address :6443, kube-controller-manager (allocating
//     node pod CIDRs from 100.96.0.0/12 and fd00:96::/56) and
//     kube-scheduler. The host reaches the API server through a relay on
//     its loopback; nothing else leaves the namespaces.
//   - each node (n1, n2, …): containerd (Debian's, with runc) and kubelet
//     in a mount namespace of their own, in which per-node directories
//     cover /var/lib/kubelet, /var/log/pods, /opt/cni/bin, /etc/cni/net.d,
//     /var/lib/cni, /run/tulle and /var/lib/tulle, so each node has its
//     own; kube-proxy (iptables) in the node's network namespace. A
//     node's default route points at the control plane, as a node's
//     points at its gateway; the control plane forwards nothing.
//   - with Options.ControlPlaneNode, the control plane is a node too (as
//     on kubeadm clusters): containerd, kubelet and kube-proxy in its
//     namespace, tainted node-role.kubernetes.io/control-plane:NoSchedule,
//     so tulle runs there and the API server reaches pods through it.
//     Its default route points onto the underlay (a node has one: tulled
//     finds its underlay by it), which leads nowhere beyond the
//     namespaces.
//
// Every kubelet gives its pods cluster DNS at DNSAddress (DeployDNS runs
// CoreDNS there); Options.E2E adds the images the upstream e2e tests run.
//
// Images are never pulled: the test image and the pause image (one static
// binary, testpod) and tulle's image (make image) are imported into each
// node's containerd. Binaries: the Kubernetes components from
// kubetest.BinDir (tools/setup builds them), containerd, runc and ctr from
// Debian.
//
// The package owns everything it creates (namespaces, processes, cgroups,
// mount points it had to make) and Close removes it all.
package kubecluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tulle-net/tulle/internal/tstest/kubetest"
	"github.com/tulle-net/tulle/internal/tstest/topo"
)

// The cluster's networks (all inside 100.64.0.0/10 and fd00::/8).
const (
	ClusterCIDR4 = "100.96.0.0/12"
	ClusterCIDR6 = "fd00:96::/56"
	ServiceCIDR  = "100.64.0.0/24"
)

// Options shape a cluster.
type Options struct {
	// Nodes is the number of kubelet nodes (default 2, at most 4).
	Nodes int
	// Dir holds every file and log (a test's TempDir).
	Dir string
	// Root is the tulle repository (for make image and the testpod build).
	Root string
	// Prefix starts the namespace names (default "tullek8s").
	Prefix string
	// Logf reports progress (nil: quiet).
	Logf func(format string, args ...any)
	// Runtime is the nodes' container runtime (default Containerd16).
	Runtime Runtime
	// ControlPlaneNode makes the control plane a node too, as kubeadm
	// does: containerd, kubelet and kube-proxy beside the API server,
	// registered with the control-plane role and taint, so tulle (which
	// tolerates every taint) runs there and the API server reaches pods
	// through it. It is the last of Cluster.Nodes.
	ControlPlaneNode bool
	// E2E imports the images the upstream e2e tests run (agnhost,
	// jessie-dnsutils, busybox, pause under its upstream name, CoreDNS:
	// MissingE2E says what that needs) on every node.
	E2E bool
}

// Cluster is a running control plane and its nodes.
type Cluster struct {
	API     *kubetest.Cluster
	Topo    *topo.Topology
	Control *topo.Node
	Nodes   []*Node // the workers, then the control plane's if it is one
	// ControlNode is the control plane's node (Options.ControlPlaneNode),
	// or nil.
	ControlNode *Node
	Client      kubernetes.Interface
	Kubeconfig  string // the host's admin kubeconfig (through the relay)

	opt      Options
	internal string // admin kubeconfig for the namespaces
	procs    []*exec.Cmd
	madeDirs []string // host directories made as mount points
	lock     *os.File
}

// Node is one kubelet node.
type Node struct {
	*topo.Node
	Dir        string
	CgroupRoot string
	// ControlPlane: the control plane's own node, tainted NoSchedule.
	ControlPlane bool
	c            *Cluster
	containerd   *exec.Cmd
	kubelet      *exec.Cmd
	kubeletDone  <-chan struct{} // closed once kubelet has exited and been reaped
	proxy        *exec.Cmd
}

// Missing says what this machine lacks to run a cluster with Debian's
// containerd, or "".
func Missing() string { return MissingFor(Containerd16) }

// MissingFor says what this machine lacks to run a cluster on runtime r,
// or "".
func MissingFor(r Runtime) string {
	if why := topo.Require(); why != "" {
		return why
	}
	if why := kubetest.Missing(); why != "" {
		return why
	}
	for _, b := range []string{"kubelet", "kube-controller-manager", "kube-scheduler", "kube-proxy", "kubectl"} {
		if _, err := os.Stat(kubetest.Bin(b)); err != nil {
			return b + " at " + kubetest.Bin(b) + " (tools/setup builds it)"
		}
	}
	if why := r.missing(); why != "" {
		return why
	}
	for _, t := range []string{"nsenter:util-linux", "unshare:util-linux", "iptables:iptables", "buildah:buildah", "make:make"} {
		name, pkg, _ := strings.Cut(t, ":")
		if _, err := exec.LookPath(name); err != nil {
			return fmt.Sprintf("%s (apt-get install %s)", name, pkg)
		}
	}
	return ""
}

// hostCNIDir is where Debian's containernetworking-plugins live; each
// node's /opt/cni/bin starts with loopback and portmap from there, as a
// node image's would.
const hostCNIDir = "/usr/lib/cni"

func (c *Cluster) logf(format string, args ...any) {
	if c.opt.Logf != nil {
		c.opt.Logf(format, args...)
	}
}

// Start builds the cluster and waits until every node is registered with a
// pod CIDR. On error everything made so far is removed.
func Start(ctx context.Context, opt Options) (c *Cluster, err error) {
	if opt.Nodes == 0 {
		opt.Nodes = 2
	}
	if opt.Nodes < 1 || opt.Nodes > 4 {
		return nil, fmt.Errorf("kubecluster: %d nodes, want 1 to 4", opt.Nodes)
	}
	if opt.Prefix == "" {
		opt.Prefix = "tullek8s"
	}
	if opt.Runtime.ConfigVersion == 0 {
		opt.Runtime = Containerd16
	}
	if why := MissingFor(opt.Runtime); why != "" {
		return nil, errors.New("kubecluster: needs " + why)
	}
	lock, err := lockShared(opt.Prefix)
	if err != nil {
		return nil, err
	}
	tp, err := topo.New(topo.Options{Nodes: opt.Nodes + 1, Prefix: opt.Prefix})
	if err != nil {
		lock.Close()
		return nil, err
	}
	c = &Cluster{Topo: tp, Control: tp.Nodes[opt.Nodes], opt: opt, lock: lock}
	defer func() {
		if err != nil {
			c.Close()
			c = nil
		}
	}()
	c.logf("control plane in %s (%s): etcd, kube-apiserver, controller-manager, scheduler; nodes on %s", c.Control.NS, c.Control.IP4, opt.Runtime.Name)
	if err := c.startControlPlane(); err != nil {
		return c, err
	}
	archives, err := buildTestImages(opt.Root, opt.Dir)
	if err != nil {
		return c, err
	}
	if opt.E2E {
		e2e, err := buildE2EImages(opt.Dir)
		if err != nil {
			return c, err
		}
		archives = append(archives, e2e...)
	}
	machines := tp.Nodes[:opt.Nodes]
	if opt.ControlPlaneNode {
		machines = tp.Nodes
	}
	for _, tn := range machines {
		n := &Node{Node: tn, c: c, Dir: filepath.Join(opt.Dir, tn.Name), CgroupRoot: "/" + opt.Prefix + "-" + tp.Suffix + "-" + tn.Name, ControlPlane: tn == c.Control}
		c.Nodes = append(c.Nodes, n)
		role := "node"
		if n.ControlPlane {
			role, c.ControlNode = "control-plane node", n
		}
		c.logf("%s %s (%s, %s): containerd, kubelet, kube-proxy", role, n.Name, n.NS, n.IP4)
		if err := n.start(ctx, archives); err != nil {
			return c, fmt.Errorf("node %s: %w", n.Name, err)
		}
	}
	if err := c.waitNodes(ctx); err != nil {
		return c, err
	}
	if c.ControlNode != nil {
		// kubelet may not give itself a node-role label; the installer
		// (kubeadm) sets it, as this does.
		if _, err := c.Kubectl(ctx, "label", "node", c.ControlNode.Name, "node-role.kubernetes.io/control-plane="); err != nil {
			return c, err
		}
	}
	return c, nil
}

func (c *Cluster) startControlPlane() error {
	dir := filepath.Join(c.opt.Dir, "control-plane")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	api, err := kubetest.StartWith(dir, kubetest.Options{
		NetNS: c.Control.NS, Address: c.Control.IP4, DoIn: topo.DoIn, ServiceCIDR: ServiceCIDR,
		Args: []string{"--kubelet-preferred-address-types", "InternalIP,Hostname", "--allow-privileged=true"},
	})
	if err != nil {
		return err
	}
	c.API = api
	if c.Kubeconfig, err = api.Kubeconfig(kubetest.AdminToken); err != nil {
		return err
	}
	if c.internal, err = api.InternalKubeconfig(kubetest.AdminToken); err != nil {
		return err
	}
	if c.Client, err = api.Client(kubetest.AdminToken); err != nil {
		return err
	}
	kcm := []string{"--kubeconfig", c.internal, "--leader-elect=false",
		"--allocate-node-cidrs", "--cluster-cidr", ClusterCIDR4 + "," + ClusterCIDR6,
		"--node-cidr-mask-size-ipv4", "24", "--node-cidr-mask-size-ipv6", "64",
		"--service-cluster-ip-range", ServiceCIDR,
		"--root-ca-file", api.CA.CAFile(),
		"--service-account-private-key-file", filepath.Join(dir, "sa.key"),
		"--bind-address", "127.0.0.1", "--v", "1"}
	if err := c.run(c.inNS(c.Control.NS, kubetest.Bin("kube-controller-manager"), kcm...), filepath.Join(dir, "controller-manager.log")); err != nil {
		return err
	}
	return c.run(c.inNS(c.Control.NS, kubetest.Bin("kube-scheduler"), "--kubeconfig", c.internal, "--leader-elect=false", "--bind-address", "127.0.0.1"),
		filepath.Join(dir, "scheduler.log"))
}

// inNS is name with args in network namespace ns.
func (c *Cluster) inNS(ns, name string, args ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--net=/run/netns/" + ns, "--", name}, args...)...)
}

// run starts cmd (logging to logPath) and remembers it for Close.
func (c *Cluster) run(cmd *exec.Cmd, logPath string) error {
	if err := kubetest.Run(cmd, logPath); err != nil {
		return err
	}
	c.procs = append(c.procs, cmd)
	return nil
}

// mountPoint makes sure the host has directory p to mount over, and
// remembers each directory it had to make (parents first) for Close.
func (c *Cluster) mountPoint(p string) error {
	var missing []string
	for d := p; d != "/"; d = filepath.Dir(d) {
		if _, err := os.Stat(d); err == nil {
			break
		}
		missing = append(missing, d)
	}
	for _, d := range slices.Backward(missing) {
		if err := os.Mkdir(d, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("mount point %s: %w", d, err)
		}
		c.madeDirs = append(c.madeDirs, d)
	}
	return nil
}

// lockShared marks a cluster running: every cluster holds a shared lock,
// and Close removes the host's mount points only when it can take the
// lock alone (an empty mount point may be another cluster's, mounted over
// in its namespaces, where removing it would detach the mount).
func lockShared(prefix string) (*os.File, error) {
	f, err := os.OpenFile(lockPath, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	// Alone: whatever a cluster of this package left behind is debris
	// (a test killed before its Close ran). Sweep it, then share.
	if syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) == nil {
		sweep(prefix)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_SH); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", lockPath, err)
	}
	return f, nil
}

// sweep removes what clusters named prefix-<suffix> left: their
// processes (every one of a node's is in its cgroup root: containerd and
// its shims in runtime/, the pods in kubepods/), cgroups and namespaces.
// Called only while no cluster runs.
func sweep(prefix string) {
	ents, _ := os.ReadDir("/sys/fs/cgroup/pids")
	var roots []string
	for _, e := range ents {
		if rest, ok := strings.CutPrefix(e.Name(), prefix+"-"); ok && e.IsDir() && len(rest) > 7 && rest[6] == '-' {
			roots = append(roots, "/"+e.Name())
		}
	}
	for _, r := range roots {
		n := &Node{CgroupRoot: r}
		n.killCgroup()
		n.removeCgroups()
	}
	out, _ := exec.Command("ip", "netns", "list").Output()
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], prefix+"-") {
			exec.Command("ip", "netns", "delete", f[0]).Run()
		}
	}
}

const lockPath = "/run/tulle-kubecluster.lock"

// removeMountPoints removes the mount points this cluster made, if no
// other cluster runs (their removal would detach its mounts).
func (c *Cluster) removeMountPoints() {
	if c.lock == nil {
		return
	}
	defer c.lock.Close()
	if syscall.Flock(int(c.lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) != nil {
		return // another cluster runs: leave them
	}
	for _, d := range slices.Backward(c.madeDirs) {
		os.Remove(d) // only if still empty
	}
	os.Remove(lockPath)
}

// nodeMounts are the directories each node has of its own, by name under
// the node's directory.
var nodeMounts = []struct{ name, path string }{
	{"kubelet", "/var/lib/kubelet"},
	{"log-pods", "/var/log/pods"},
	{"log-containers", "/var/log/containers"},
	{"cni-bin", "/opt/cni/bin"},
	{"cni-conf", "/etc/cni/net.d"},
	{"cni-state", "/var/lib/cni"},
	{"tulle-run", "/run/tulle"},
	{"tulle-state", "/var/lib/tulle"},
}

func (n *Node) path(name string) string { return filepath.Join(n.Dir, name) }

// Host returns where the node's own directory for path (one of
// /var/lib/kubelet, /opt/cni/bin, /etc/cni/net.d, /var/lib/cni,
// /run/tulle, /var/lib/tulle, …) is on the host.
func (n *Node) Host(path string) string {
	for _, m := range nodeMounts {
		if rest, ok := strings.CutPrefix(path, m.path); ok && (rest == "" || rest[0] == '/') {
			return n.path(m.name) + rest
		}
	}
	return ""
}

func (n *Node) start(ctx context.Context, archives []string) error {
	c := n.c
	for _, m := range nodeMounts {
		if err := os.MkdirAll(n.path(m.name), 0o755); err != nil {
			return err
		}
		if err := c.mountPoint(m.path); err != nil {
			return err
		}
	}
	for _, p := range []string{"loopback", "portmap"} {
		if err := copyFile(c.opt.Runtime.cniPlugin(p), filepath.Join(n.path("cni-bin"), p), 0o755); err != nil {
			return err
		}
	}
	routes := [][]string{
		{"ip", "-n", n.NS, "route", "add", "default", "via", c.Control.IP4.String()},
		{"ip", "-n", n.NS, "-6", "route", "add", "default", "via", c.Control.IP6.String()},
	}
	if n.ControlPlane {
		// A node has a default route (tulled finds its underlay by it);
		// the control plane's points onto the underlay, which leads
		// nowhere beyond the namespaces.
		routes = [][]string{
			{"ip", "-n", n.NS, "route", "add", "default", "dev", n.Link},
			{"ip", "-n", n.NS, "-6", "route", "add", "default", "dev", n.Link},
		}
	}
	for _, r := range routes {
		if out, err := exec.Command(r[0], r[1:]...).CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %w: %s", strings.Join(r, " "), err, out)
		}
	}
	if err := n.makeCgroups(); err != nil {
		return err
	}
	if err := n.writeConfigs(); err != nil {
		return err
	}
	// containerd in a new mount namespace that covers the node's
	// directories; kubelet joins it, so both see the same mounts.
	var script strings.Builder
	for _, m := range nodeMounts {
		fmt.Fprintf(&script, "mount --bind %q %q && ", n.path(m.name), m.path)
	}
	script.WriteString("mount -t tmpfs tmpfs /run/netns && exec " + strconv.Quote(c.opt.Runtime.bin("containerd")) + " --config " + strconv.Quote(n.path("containerd.toml")))
	n.containerd = exec.Command("nsenter", "--net=/run/netns/"+n.NS, "--", "unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script.String())
	if d := c.opt.Runtime.Dir; d != "" {
		// containerd finds its shim on PATH.
		n.containerd.Env = append(os.Environ(), "PATH="+d+":"+os.Getenv("PATH"))
	}
	if err := c.run(n.containerd, n.path("containerd.log")); err != nil {
		return err
	}
	// containerd, and the shims it starts, in the node's cgroup root: a
	// node's every process is there, for Close and sweep to find.
	if err := n.joinCgroup("runtime", n.containerd.Process.Pid); err != nil {
		return err
	}
	if err := waitFor(ctx, 30*time.Second, func() error {
		if n.containerd.ProcessState != nil {
			return errors.New("containerd exited (see " + n.path("containerd.log") + ")")
		}
		return exec.Command(c.opt.Runtime.bin("ctr"), "--address", n.sock(), "version").Run()
	}); err != nil {
		return fmt.Errorf("containerd: %w", err)
	}
	for _, a := range archives {
		if err := n.Import(a); err != nil {
			return err
		}
	}
	if err := n.StartKubelet(); err != nil {
		return err
	}
	n.proxy = c.inNS(n.NS, kubetest.Bin("kube-proxy"), "--config", n.path("kube-proxy.yaml"))
	return c.run(n.proxy, n.path("kube-proxy.log"))
}

func (n *Node) sock() string { return n.path("containerd.sock") }

// Import loads a docker-archive into the node's containerd (the k8s.io
// namespace, where kubelet's images live).
func (n *Node) Import(archive string) error {
	out, err := exec.Command(n.c.opt.Runtime.bin("ctr"), "--address", n.sock(), "-n", "k8s.io", "images", "import", archive).CombinedOutput()
	if err != nil {
		return fmt.Errorf("import %s into %s: %w: %s", filepath.Base(archive), n.Name, err, out)
	}
	return nil
}

// StartKubelet starts the node's kubelet in its mount namespace (again,
// after StopKubelet).
func (n *Node) StartKubelet() error {
	if n.kubeletDone != nil {
		select {
		case <-n.kubeletDone:
		default:
			return fmt.Errorf("%s: kubelet already running", n.Name)
		}
	}
	args := []string{"--target", strconv.Itoa(n.containerd.Process.Pid), "--mount", "--net", "--",
		kubetest.Bin("kubelet"), "--config", n.path("kubelet.yaml"), "--kubeconfig", n.c.internal,
		"--hostname-override", n.Name, "--node-ip", n.IP4.String() + "," + n.IP6.String(), "--v", "1"}
	if n.ControlPlane {
		args = append(args, "--register-with-taints", "node-role.kubernetes.io/control-plane:NoSchedule")
	}
	n.kubelet = exec.Command("nsenter", args...)
	done, err := kubetest.StartProcess(n.kubelet, n.path("kubelet.log"))
	if err != nil {
		return err
	}
	n.kubeletDone = done
	n.c.procs = append(n.c.procs, n.kubelet)
	return nil
}

// StopKubelet stops the node's kubelet (SIGTERM, then SIGKILL after 10 s)
// and returns once it has been reaped; its pods keep running, as on a
// real node.
func (n *Node) StopKubelet() {
	if n.kubeletDone == nil {
		return
	}
	n.kubelet.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.kubeletDone:
	case <-time.After(10 * time.Second):
		n.kubelet.Process.Kill()
		<-n.kubeletDone
	}
}

// stop ends cmd: SIGTERM, SIGKILL after grace, and waits for it.
func stop(cmd *exec.Cmd, grace time.Duration) {
	if cmd == nil || cmd.Process == nil || cmd.ProcessState != nil {
		return
	}
	cmd.Process.Signal(syscall.SIGTERM)
	deadline := time.Now().Add(grace)
	for cmd.ProcessState == nil && syscall.Kill(cmd.Process.Pid, 0) == nil {
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			deadline = time.Now().Add(grace)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (n *Node) writeConfigs() error {
	d := n.Dir
	files := map[string]string{
		"containerd.toml": n.c.opt.Runtime.config(n),
		"resolv.conf":     "nameserver " + n.c.Control.IP4.String() + "\n",
		"kubelet.yaml": fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://%s
cgroupDriver: cgroupfs
cgroupRoot: %s
failCgroupV1: false
failSwapOn: false
resolvConf: %s
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
serializeImagePulls: false
evictionHard: {memory.available: "1Mi", nodefs.available: "1%%", imagefs.available: "1%%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
localStorageCapacityIsolation: false
registerNode: true
nodeStatusUpdateFrequency: 5s
clusterDNS: [%s]
clusterDomain: %s
`, n.sock(), n.CgroupRoot, filepath.Join(d, "resolv.conf"), DNSAddress, ClusterDomain),
		"kube-proxy.yaml": fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: %q}
hostnameOverride: %s
mode: iptables
clusterCIDR: %s
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
`, n.c.internal, n.Name, ClusterCIDR4+","+ClusterCIDR6),
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(d, name), []byte(body), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// cgroupHierarchies are the cgroup v1 hierarchies kubelet's cgroupfs
// driver uses (this machine kind has v1).
func cgroupHierarchies() ([]string, error) {
	ents, err := os.ReadDir("/sys/fs/cgroup")
	if err != nil {
		return nil, err
	}
	var hs []string
	for _, e := range ents {
		if e.IsDir() && e.Name() != "unified" {
			hs = append(hs, filepath.Join("/sys/fs/cgroup", e.Name()))
		}
	}
	return hs, nil
}

// makeCgroups makes the node's cgroup root in every hierarchy.
func (n *Node) makeCgroups() error {
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	for _, h := range hs {
		if err := makeCgroup(h, n.CgroupRoot); err != nil {
			return err
		}
	}
	return nil
}

// makeCgroup makes cgroup rel in hierarchy h; a cpuset one gets its
// parent's CPUs and memory nodes, without which no task can join it.
func makeCgroup(h, rel string) error {
	p := filepath.Join(h, rel)
	if err := os.MkdirAll(p, 0o755); err != nil {
		return fmt.Errorf("cgroup %s: %w", p, err)
	}
	if filepath.Base(h) != "cpuset" {
		return nil
	}
	for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
		b, err := os.ReadFile(filepath.Join(filepath.Dir(p), f))
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(p, f), b, 0o644); err != nil {
			return fmt.Errorf("cgroup %s: %w", filepath.Join(p, f), err)
		}
	}
	return nil
}

// joinCgroup moves pid into the node's cgroup root/sub in every hierarchy.
func (n *Node) joinCgroup(sub string, pid int) error {
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	for _, h := range hs {
		rel := filepath.Join(n.CgroupRoot, sub)
		if err := makeCgroup(h, rel); err != nil {
			return err
		}
		p := filepath.Join(h, rel, "cgroup.procs")
		if err := os.WriteFile(p, []byte(strconv.Itoa(pid)), 0o644); err != nil {
			return fmt.Errorf("move %d into %s: %w", pid, p, err)
		}
	}
	return nil
}

// waitNodes waits until every node is registered and has pod CIDRs.
func (c *Cluster) waitNodes(ctx context.Context) error {
	return waitFor(ctx, 120*time.Second, func() error {
		for _, n := range c.Nodes {
			node, err := c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				return fmt.Errorf("node %s: %w", n.Name, err)
			}
			if len(node.Spec.PodCIDRs) == 0 {
				return fmt.Errorf("node %s has no pod CIDR yet", n.Name)
			}
		}
		return nil
	})
}

// waitFor retries f until it returns nil, ctx ends or d passes; the error
// says what f last said.
func waitFor(ctx context.Context, d time.Duration, f func() error) error {
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("after %s: %w", d, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), err)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// Kubectl runs the cluster's kubectl (the version the cluster runs) with
// the admin kubeconfig and returns its output.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, kubetest.Bin("kubectl"), append([]string{"--kubeconfig", c.Kubeconfig}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// NodeReady reports the node's Ready condition and its message.
func NodeReady(n *corev1.Node) (bool, string) {
	for _, cd := range n.Status.Conditions {
		if cd.Type == corev1.NodeReady {
			return cd.Status == corev1.ConditionTrue, cd.Message
		}
	}
	return false, "no Ready condition yet"
}

// Close stops every process, removes the pods' containers, cgroups and
// namespaces, and the mount points it had to make on the host. It is safe
// on a partly built cluster.
func (c *Cluster) Close() error {
	var errs []error
	for _, n := range c.Nodes {
		n.StopKubelet()
		stop(n.proxy, 5*time.Second)
	}
	// Containers, shims and containerd: every process in the node's
	// cgroup root.
	for _, n := range c.Nodes {
		n.killCgroup()
		stop(n.containerd, 5*time.Second)
	}
	for _, p := range c.procs {
		stop(p, 5*time.Second)
	}
	if c.API != nil {
		c.API.Stop()
	}
	for _, n := range c.Nodes {
		if err := n.removeCgroups(); err != nil {
			errs = append(errs, err)
		}
	}
	if c.Topo != nil {
		if err := c.Topo.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	c.removeMountPoints()
	return errors.Join(errs...)
}

// killCgroup kills every process in the node's cgroups (the pods'), until
// none is left.
func (n *Node) killCgroup() {
	root := filepath.Join("/sys/fs/cgroup/pids", n.CgroupRoot)
	for range 50 {
		found := false
		filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err != nil || d.Name() != "cgroup.procs" {
				return nil
			}
			b, _ := os.ReadFile(p)
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil {
					syscall.Kill(pid, syscall.SIGKILL)
					found = true
				}
			}
			return nil
		})
		if !found {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// removeCgroups removes the node's cgroup trees, deepest first.
func (n *Node) removeCgroups() error {
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	var errs []error
	for _, h := range hs {
		root := filepath.Join(h, n.CgroupRoot)
		var dirs []string
		filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for _, d := range slices.Backward(dirs) {
			var err error
			for range 50 { // a killed task leaves its cgroup a moment later
				if err = os.Remove(d); err == nil || errors.Is(err, os.ErrNotExist) {
					err = nil
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", d, err))
			}
		}
	}
	return errors.Join(errs...)
}

// RandomTag is a fresh image tag, prefix-<hex> (tulle's image is built
// per cluster).
func RandomTag(prefix string) string {
	var b [4]byte
	rand.Read(b[:])
	return prefix + "-" + hex.EncodeToString(b[:])
}
