package kubecluster

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/internal/tstest/topo"
)

// TulleNamespace and TulleDaemonSet are where deploy/ puts tulle.
const (
	TulleNamespace = "tulle-system"
	TulleDaemonSet = "tulle"
)

// InstallTulle builds tulle's image with o.Tag (make image), imports it on
// every node and applies deploy/ through a kustomize overlay that sets the
// tag (and what else o says): `kubectl apply -k`, as a user installs it.
func (c *Cluster) InstallTulle(ctx context.Context, o Overlay) error {
	tag := o.Tag
	start := time.Now()
	archive, err := BuildTulleImage(c.opt.Root, c.opt.Dir, tag)
	if err != nil {
		return err
	}
	c.logf("tulle:%s built (make image) in %s", tag, time.Since(start).Round(time.Millisecond))
	start = time.Now()
	for _, n := range c.Nodes {
		if err := n.Import(archive); err != nil {
			return err
		}
	}
	c.logf("tulle:%s imported on %d nodes in %s", tag, len(c.Nodes), time.Since(start).Round(time.Millisecond))
	return c.ApplyTulle(ctx, o)
}

// Overlay is what a user's kustomize overlay of deploy/ changes.
type Overlay struct {
	// Tag is the image tag.
	Tag string
	// Patch is a JSON 6902 patch of the DaemonSet (YAML list of
	// operations), or "".
	Patch string
	// NetConf replaces net-conf.json in the ConfigMap, or "".
	NetConf string
	// Conflist replaces 10-tulle.conflist in the ConfigMap, or "".
	Conflist string
}

// ApplyTulle applies deploy/ through the overlay (kubectl apply -k).
func (c *Cluster) ApplyTulle(ctx context.Context, o Overlay) error {
	dir := filepath.Join(c.opt.Dir, "tulle-overlay")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	base, err := filepath.Rel(dir, filepath.Join(c.opt.Root, "deploy"))
	if err != nil {
		return err
	}
	k := fmt.Sprintf("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - %s\nimages:\n  - name: tulle\n    newTag: %s\n", base, o.Tag)
	if o.Patch != "" {
		k += "patches:\n  - target: {kind: DaemonSet, name: tulle}\n    patch: |-\n" + Indent(o.Patch, "      ")
	}
	var files []string
	for _, f := range []struct{ name, body string }{{"net-conf.json", o.NetConf}, {"10-tulle.conflist", o.Conflist}} {
		if f.body == "" {
			continue
		}
		if err := os.WriteFile(filepath.Join(dir, f.name), []byte(f.body), 0o644); err != nil {
			return err
		}
		files = append(files, f.name)
	}
	if len(files) > 0 {
		k += "configMapGenerator:\n  - name: tulle-config\n    behavior: merge\n    files: [" + strings.Join(files, ", ") + "]\n"
	}
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o644); err != nil {
		return err
	}
	_, err = c.Kubectl(ctx, "apply", "-k", dir)
	return err
}

// Indent puts prefix before every line of s.
func Indent(s, prefix string) string {
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString(prefix + l + "\n")
	}
	return b.String()
}

// WaitTulle waits until the DaemonSet's current generation is rolled out
// and Ready on every node.
func (c *Cluster) WaitTulle(ctx context.Context, d time.Duration) error {
	return waitFor(ctx, d, func() error {
		ds, err := c.Client.AppsV1().DaemonSets(TulleNamespace).Get(ctx, TulleDaemonSet, metav1.GetOptions{})
		if err != nil {
			return err
		}
		s, want := ds.Status, int32(len(c.Nodes))
		if s.ObservedGeneration < ds.Generation || s.DesiredNumberScheduled != want || s.UpdatedNumberScheduled != want || s.NumberReady != want || s.NumberAvailable != want {
			return fmt.Errorf("daemonset %s: %d desired, %d updated, %d ready, %d available; want %d of each", TulleDaemonSet,
				s.DesiredNumberScheduled, s.UpdatedNumberScheduled, s.NumberReady, s.NumberAvailable, want)
		}
		return nil
	})
}

// TestPorts: the test pods serve HTTP on 8080; their Service on 80.
const (
	TestPodPort = 8080
	ServicePort = 80
)

// DeployTestPods creates a Deployment of test pods spread over the nodes
// and a ClusterIP Service in front of them, and waits until all are Ready.
func (c *Cluster) DeployTestPods(ctx context.Context, ns, name string, replicas int) error {
	labels := map[string]string{"app": name}
	r := int32(replicas)
	d := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: appsv1.DeploymentSpec{
			Replicas: &r,
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					TopologySpreadConstraints: []corev1.TopologySpreadConstraint{{
						MaxSkew: 1, TopologyKey: "kubernetes.io/hostname", WhenUnsatisfiable: corev1.DoNotSchedule,
						LabelSelector: &metav1.LabelSelector{MatchLabels: labels},
					}},
					TerminationGracePeriodSeconds: ptr(int64(2)),
					Containers: []corev1.Container{{
						Name: "testpod", Image: TestImage, ImagePullPolicy: corev1.PullNever,
						Ports: []corev1.ContainerPort{{ContainerPort: TestPodPort}},
						ReadinessProbe: &corev1.Probe{
							ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/", Port: intstr.FromInt32(TestPodPort)}},
							PeriodSeconds: 1,
						},
					}},
				},
			},
		},
	}
	if _, err := c.Client.AppsV1().Deployments(ns).Create(ctx, d, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create deployment %s: %w", name, err)
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.ServiceSpec{
			Selector: labels,
			Ports:    []corev1.ServicePort{{Port: ServicePort, TargetPort: intstr.FromInt32(TestPodPort)}},
		},
	}
	if _, err := c.Client.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create service %s: %w", name, err)
	}
	return c.WaitPods(ctx, ns, name, replicas, 120*time.Second)
}

// WaitPods waits until the Deployment app has exactly replicas pods, all
// Ready.
func (c *Cluster) WaitPods(ctx context.Context, ns, app string, replicas int, d time.Duration) error {
	return c.waitSelected(ctx, ns, "app="+app, replicas, d)
}

// waitSelected waits until exactly replicas pods match selector, all Ready.
func (c *Cluster) waitSelected(ctx context.Context, ns, selector string, replicas int, d time.Duration) error {
	return waitFor(ctx, d, func() error {
		pods, err := c.Pods(ctx, ns, selector)
		if err != nil {
			return err
		}
		ready := 0
		for _, p := range pods {
			if podReady(&p) {
				ready++
			}
		}
		if ready != replicas || len(pods) != replicas {
			return fmt.Errorf("pods %s: %d of %d ready (%d exist)%s", selector, ready, replicas, len(pods), podTrouble(pods))
		}
		return nil
	})
}

func ptr[T any](v T) *T { return &v }

func podReady(p *corev1.Pod) bool {
	if p.DeletionTimestamp != nil || p.Status.Phase != corev1.PodRunning {
		return false
	}
	for _, cd := range p.Status.Conditions {
		if cd.Type == corev1.PodReady {
			return cd.Status == corev1.ConditionTrue
		}
	}
	return false
}

// podTrouble describes why pods are not running yet (their waiting
// reasons and last events are where CNI errors show).
func podTrouble(pods []corev1.Pod) string {
	var b strings.Builder
	for _, p := range pods {
		for _, cs := range p.Status.ContainerStatuses {
			if w := cs.State.Waiting; w != nil && w.Reason != "" {
				fmt.Fprintf(&b, "; %s: %s %s", p.Name, w.Reason, w.Message)
			}
		}
		if p.Status.Phase == corev1.PodPending && len(p.Status.ContainerStatuses) == 0 {
			fmt.Fprintf(&b, "; %s: pending on %q", p.Name, p.Spec.NodeName)
		}
	}
	return b.String()
}

// Pods lists the pods matching selector, ordered by node then name.
func (c *Cluster) Pods(ctx context.Context, ns, selector string) ([]corev1.Pod, error) {
	l, err := c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		return nil, err
	}
	pods := l.Items
	sort.Slice(pods, func(i, j int) bool {
		if pods[i].Spec.NodeName != pods[j].Spec.NodeName {
			return pods[i].Spec.NodeName < pods[j].Spec.NodeName
		}
		return pods[i].Name < pods[j].Name
	})
	return pods, nil
}

// Node returns the node of that name, or nil.
func (c *Cluster) Node(name string) *Node {
	for _, n := range c.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// PodGet sends GET path to the pod's test server from its node's network
// namespace (the host has no route into the cluster) and returns the body.
func (c *Cluster) PodGet(ctx context.Context, pod *corev1.Pod, ip, path string) (string, error) {
	n := c.Node(pod.Spec.NodeName)
	if n == nil {
		return "", fmt.Errorf("pod %s is on %q, not a node of this cluster", pod.Name, pod.Spec.NodeName)
	}
	return n.Get(ctx, "http://"+net.JoinHostPort(ip, strconv.Itoa(TestPodPort))+path)
}

// Get sends GET url from the node's network namespace.
func (n *Node) Get(ctx context.Context, rawURL string) (string, error) {
	hc := &http.Client{Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (conn net.Conn, err error) {
			err = topo.DoIn(n.NS, func() (err error) {
				conn, err = (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, network, addr)
				return err
			})
			return conn, err
		},
	}}
	req, err := http.NewRequestWithContext(ctx, "GET", rawURL, nil)
	if err != nil {
		return "", err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != 200 {
		return "", fmt.Errorf("%s: %s", resp.Status, strings.TrimSpace(string(b)))
	}
	return string(b), nil
}

// Probe asks pod (through its own address ip) to reach target: kind tcp
// (host:port), http (host:port) or ping (an address).
func (c *Cluster) Probe(ctx context.Context, pod *corev1.Pod, ip, kind, target string) (string, error) {
	return c.PodGet(ctx, pod, ip, "/probe?kind="+kind+"&target="+url.QueryEscape(target))
}

// Silence is what /udpwatch measured: datagrams sent and echoed, and the
// longest time without an echo.
type Silence struct {
	Sent, Received, LongestGapMs int
}

// UDPWatch has pod from send a datagram every 10 ms for d to to's UDP echo
// (over IPv4) and reports the answers.
func (c *Cluster) UDPWatch(ctx context.Context, from, to *corev1.Pod, d time.Duration) (Silence, error) {
	fv4, _ := PodIPs(from)
	tv4, _ := PodIPs(to)
	target := net.JoinHostPort(tv4, strconv.Itoa(TestPodPort+1))
	out, err := c.PodGet(ctx, from, fv4, "/udpwatch?interval=10ms&duration="+d.String()+"&target="+url.QueryEscape(target))
	var s Silence
	if err == nil {
		err = json.Unmarshal([]byte(out), &s)
	}
	if err != nil {
		return s, fmt.Errorf("UDP echo %s → %s: %w", from.Name, target, err)
	}
	return s, nil
}

// PodIPs returns the pod's addresses: IPv4 first, then IPv6.
func PodIPs(p *corev1.Pod) (v4, v6 string) {
	for _, ip := range p.Status.PodIPs {
		if a := net.ParseIP(ip.IP); a != nil && a.To4() != nil {
			v4 = ip.IP
		} else if a != nil {
			v6 = ip.IP
		}
	}
	return v4, v6
}

// WaitServiceAccount waits for the namespace's default ServiceAccount (the
// controller-manager makes it; pods are refused before).
func (c *Cluster) WaitServiceAccount(ctx context.Context, ns string) error {
	return waitFor(ctx, 60*time.Second, func() error {
		_, err := c.Client.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err
	})
}

// Answer is what a test pod's server says of itself.
type Answer struct {
	Hostname string
	Addrs    []string
	From     string // the client's address as the server saw it
}

// Reach has pod from fetch to's server over IPv4 (fam 4) or IPv6 (6) and
// checks that to answered, seeing from's own address (no masquerade
// inside the cluster network).
func (c *Cluster) Reach(ctx context.Context, from, to *corev1.Pod, fam int) error {
	fv4, _ := PodIPs(from)
	v4, v6 := PodIPs(to)
	ip := v4
	if fam == 6 {
		ip = v6
	}
	if ip == "" {
		return fmt.Errorf("pod %s has no IPv%d address (%v)", to.Name, fam, to.Status.PodIPs)
	}
	target := net.JoinHostPort(ip, strconv.Itoa(TestPodPort))
	out, err := c.Probe(ctx, from, fv4, "http", target)
	if err != nil {
		return fmt.Errorf("%s (%s) → %s (%s) %s: %w", from.Name, from.Spec.NodeName, to.Name, to.Spec.NodeName, target, err)
	}
	var a Answer
	if err := json.Unmarshal([]byte(out), &a); err != nil || a.Hostname != to.Name {
		return fmt.Errorf("%s → %s: answer %q, want hostname %s", from.Name, target, out, to.Name)
	}
	host, _, _ := net.SplitHostPort(a.From)
	for _, pip := range from.Status.PodIPs {
		if pip.IP == host {
			return nil
		}
	}
	return fmt.Errorf("%s → %s: seen from %s, not one of the pod's addresses %v", from.Name, target, host, from.Status.PodIPs)
}

// ViaService has pod from fetch http://clusterIP:ServicePort/ until an
// endpoint on another node answers (for up to 30 s: kube-proxy programs a
// new endpoint a moment after it is Ready) and returns that endpoint's pod
// name and node.
func (c *Cluster) ViaService(ctx context.Context, from *corev1.Pod, clusterIP string) (string, error) {
	fv4, _ := PodIPs(from)
	target := net.JoinHostPort(clusterIP, strconv.Itoa(ServicePort))
	seen := map[string]bool{}
	var last error
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		out, err := c.Probe(ctx, from, fv4, "http", target)
		if err != nil {
			last = err
			continue
		}
		var a Answer
		if err := json.Unmarshal([]byte(out), &a); err != nil {
			return "", fmt.Errorf("%s → service %s: answer %q", from.Name, target, out)
		}
		seen[a.Hostname] = true
		p, err := c.Client.CoreV1().Pods(from.Namespace).Get(ctx, a.Hostname, metav1.GetOptions{})
		if err == nil && p.Spec.NodeName != from.Spec.NodeName {
			return a.Hostname + " on " + p.Spec.NodeName, nil
		}
	}
	return "", fmt.Errorf("%s (%s) → service %s: for 30 s no answer from an endpoint on another node (%d endpoints answered; last error: %v)", from.Name, from.Spec.NodeName, target, len(seen), last)
}

// TulleStatus asks the node's tulled for its status (the socket in the
// node's /run/tulle).
func (n *Node) TulleStatus(ctx context.Context) (*api.Status, error) {
	return api.Get(ctx, filepath.Join(n.Host("/run/tulle"), api.SocketName))
}

// TulleDown records, per node, when no Ready tulle pod ran there: what a
// rollout costs each node's datapath. Watch polls until ctx ends.
type TulleDown struct {
	mu      sync.Mutex
	down    map[string][]Interval
	current map[string]time.Time
}

// Interval is a span of time; End is zero while it lasts.
type Interval struct{ Start, End time.Time }

// WatchTulle starts recording until ctx ends.
func (c *Cluster) WatchTulle(ctx context.Context) *TulleDown {
	d := &TulleDown{down: map[string][]Interval{}, current: map[string]time.Time{}}
	go func() {
		for ctx.Err() == nil {
			pods, err := c.Pods(ctx, TulleNamespace, "app.kubernetes.io/name=tulle")
			now := time.Now()
			if err == nil {
				up := map[string]bool{}
				for i := range pods {
					if podReady(&pods[i]) {
						up[pods[i].Spec.NodeName] = true
					}
				}
				d.mu.Lock()
				for _, n := range c.Nodes {
					start, isDown := d.current[n.Name]
					switch {
					case !up[n.Name] && !isDown:
						d.current[n.Name] = now
					case up[n.Name] && isDown:
						d.down[n.Name] = append(d.down[n.Name], Interval{start, now})
						delete(d.current, n.Name)
					}
				}
				d.mu.Unlock()
			}
			select {
			case <-ctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	return d
}

// Down returns the node's intervals without a Ready tulle pod so far (an
// open one ends now).
func (d *TulleDown) Down(node string) []Interval {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := append([]Interval(nil), d.down[node]...)
	if s, ok := d.current[node]; ok {
		out = append(out, Interval{s, time.Now()})
	}
	return out
}

// Overlaps reports whether any of the node's down intervals, widened by
// margin, meets [from, to].
func (d *TulleDown) Overlaps(node string, from, to time.Time, margin time.Duration) bool {
	for _, iv := range d.Down(node) {
		if !iv.Start.Add(-margin).After(to) && !iv.End.Add(margin).Before(from) {
			return true
		}
	}
	return false
}
