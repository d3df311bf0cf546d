package policy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"sigs.k8s.io/knftables"

	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/internal/atomicfile"
)

// Options configure a Controller.
type Options struct {
	Client kubernetes.Interface
	// Node is this node's name; Subnets its pod subnets.
	Node    string
	Subnets []netip.Prefix
	// NFT is the table's nftables handle (TableName, family inet).
	NFT knftables.Interface
	// StateFile keeps the CNI plugin's attachments across restarts ("":
	// memory only).
	StateFile string
	// Debounce gathers the events of a burst into one change (default
	// 20 ms); Check is how often the table is checked against what was
	// applied (default 30 s).
	Debounce, Check time.Duration
	Logger          *slog.Logger
}

// Controller keeps the table in step with the API server and the CNI
// plugin's attachments.
type Controller struct {
	opt   Options
	log   *slog.Logger
	table *Table

	factory                    informers.SharedInformerFactory
	pods, namespaces, policies cache.SharedIndexInformer

	kick chan struct{}

	mu sync.Mutex
	// attached are the CNI plugin's attachments by address.
	attached map[netip.Addr]attachment
	// fetched are pods read from the API server for an attachment before
	// the informer had them (key → pod).
	fetched map[string]*corev1.Pod
	// gen counts changes asked for; applied is the gen the table holds.
	gen, applied uint64
	// appliedCh is closed (and replaced) on every successful apply.
	appliedCh chan struct{}
	synced    bool
	status    api.PolicyStatus

	// attachSeconds is how long ADDs waited for their rules.
	attachSeconds prometheus.Histogram
}

type attachment struct {
	Namespace, Name string
	UID             types.UID
	ContainerID     string
}

func (a attachment) key() string { return a.Namespace + "/" + a.Name }

// New returns a controller; Run starts it.
func New(opt Options) *Controller {
	if opt.Debounce == 0 {
		opt.Debounce = 20 * time.Millisecond
	}
	if opt.Check == 0 {
		opt.Check = 30 * time.Second
	}
	if opt.Logger == nil {
		opt.Logger = slog.Default()
	}
	c := &Controller{opt: opt, log: opt.Logger.With("component", "policy"), table: NewTable(opt.NFT), kick: make(chan struct{}, 1),
		attached: map[netip.Addr]attachment{}, fetched: map[string]*corev1.Pod{}, appliedCh: make(chan struct{})}
	c.status.Enabled = true
	c.attachSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "tulle_policy_attach_seconds",
		Help:    "How long a pod's CNI ADD waited for its NetworkPolicy rules (lookup, transaction).",
		Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}})
	c.loadState()
	f := informers.NewSharedInformerFactoryWithOptions(opt.Client, 0, informers.WithTransform(slim))
	c.pods = f.Core().V1().Pods().Informer()
	c.namespaces = f.Core().V1().Namespaces().Informer()
	c.policies = f.Networking().V1().NetworkPolicies().Informer()
	h := cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { c.changed() },
		UpdateFunc: func(old, cur any) {
			if !reflect.DeepEqual(old, cur) {
				c.changed()
			}
		},
		DeleteFunc: func(obj any) { c.deleted(obj) },
	}
	for _, inf := range []cache.SharedIndexInformer{c.pods, c.namespaces, c.policies} {
		inf.AddEventHandler(h)
	}
	c.factory = f
	return c
}

// slim keeps of an object what policy reads: the cache holds a fraction
// of each Pod, and updates that change nothing policy reads compare equal.
func slim(obj any) (any, error) {
	switch o := obj.(type) {
	case *corev1.Pod:
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: o.Name, Namespace: o.Namespace, UID: o.UID, Labels: o.Labels},
			Spec:   corev1.PodSpec{NodeName: o.Spec.NodeName, HostNetwork: o.Spec.HostNetwork},
			Status: corev1.PodStatus{Phase: o.Status.Phase, PodIPs: o.Status.PodIPs}}
		p.Spec.Containers, p.Spec.InitContainers = slimContainers(o.Spec.Containers), slimContainers(o.Spec.InitContainers)
		return p, nil
	case *corev1.Namespace:
		return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: o.Name, UID: o.UID, Labels: o.Labels}}, nil
	case *networkingv1.NetworkPolicy:
		return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: o.Name, Namespace: o.Namespace, UID: o.UID, ResourceVersion: o.ResourceVersion}, Spec: o.Spec}, nil
	}
	return obj, nil
}

// slimContainers keeps the named ports (and whether a container is a
// sidecar) of containers that have any.
func slimContainers(cs []corev1.Container) []corev1.Container {
	var out []corev1.Container
	for _, ct := range cs {
		var ports []corev1.ContainerPort
		for _, cp := range ct.Ports {
			if cp.Name != "" {
				ports = append(ports, corev1.ContainerPort{Name: cp.Name, Protocol: cp.Protocol, ContainerPort: cp.ContainerPort})
			}
		}
		if ports != nil {
			out = append(out, corev1.Container{Ports: ports, RestartPolicy: ct.RestartPolicy})
		}
	}
	return out
}

func (c *Controller) changed() {
	c.mu.Lock()
	c.gen++
	c.mu.Unlock()
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// deleted forgets the attachments of a deleted pod (the CNI plugin's DEL
// may never come when tulled was down).
func (c *Controller) deleted(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	if p, ok := obj.(*corev1.Pod); ok {
		c.mu.Lock()
		drop := false
		for ip, a := range c.attached {
			if a.Namespace == p.Namespace && a.Name == p.Name && (a.UID == "" || a.UID == p.UID) {
				delete(c.attached, ip)
				drop = true
			}
		}
		delete(c.fetched, p.Namespace+"/"+p.Name)
		if drop {
			c.saveStateLocked()
		}
		c.mu.Unlock()
	}
	c.changed()
}

// Run starts the informers, waits for them, then keeps the table in step
// until ctx ends. The table stays as it is meanwhile: until the informers
// hold the API server's state, the rules of the last run are the best
// there is (a restart never opens a window).
func (c *Controller) Run(ctx context.Context) error {
	c.factory.Start(ctx.Done())
	c.log.Info("NetworkPolicy enforcement on: waiting for pods, namespaces and policies from the API server")
	if !cache.WaitForCacheSync(ctx.Done(), c.pods.HasSynced, c.namespaces.HasSynced, c.policies.HasSynced) {
		return nil
	}
	c.pruneAttachments()
	c.mu.Lock()
	c.synced = true
	c.mu.Unlock()
	c.changed()
	check := time.NewTicker(c.opt.Check)
	defer check.Stop()
	var retry <-chan time.Time
	backoff := time.Duration(0)
	for {
		select {
		case <-ctx.Done():
			c.factory.Shutdown()
			return nil
		case <-c.kick:
		case <-retry:
		case <-check.C:
			if err := c.table.Check(ctx); err != nil {
				c.log.Warn("policy table changed behind tulled's back; rebuilding it", "err", err)
				c.table.Forget()
			} else {
				continue
			}
		}
		// Gather the rest of a burst (a namespace of pods, a policy and
		// its pods) into one transaction.
		select {
		case <-time.After(c.opt.Debounce):
		case <-ctx.Done():
			continue
		}
		select {
		case <-c.kick:
		default:
		}
		if err := c.sync(ctx); err != nil {
			backoff = min(max(2*backoff, 100*time.Millisecond), 10*time.Second)
			c.log.Error("apply NetworkPolicy rules; retrying", "in", backoff, "err", err)
			retry = time.After(backoff)
			continue
		}
		backoff, retry = 0, nil
	}
}

// sync compiles the current state and applies it.
func (c *Controller) sync(ctx context.Context) error {
	c.mu.Lock()
	gen := c.gen
	st := c.stateLocked()
	c.mu.Unlock()
	start := time.Now()
	rs, rep := Compile(st)
	err := c.table.Apply(ctx, rs)
	c.mu.Lock()
	defer c.mu.Unlock()
	problems := slices.Clone(rep.Problems)
	if err != nil {
		c.status.Error = err.Error()
		return err
	}
	for _, p := range problems {
		if !slices.Contains(c.status.Problems, p) {
			c.log.Warn("NetworkPolicy content not enforced as written (less is allowed, never more)", "policy", p.Policy, "problem", p.Message)
		}
	}
	c.status = *rep
	c.status.Synced, c.status.Applied = true, time.Now()
	c.applied = gen
	close(c.appliedCh)
	c.appliedCh = make(chan struct{})
	c.log.Debug("NetworkPolicy rules applied", "pods", len(rep.Pods), "took", time.Since(start))
	return nil
}

// stateLocked builds the compiler's input from the caches and the
// attachments.
func (c *Controller) stateLocked() *State {
	st := &State{Namespaces: map[string]map[string]string{}, Local: map[netip.Addr]*Pod{}, Subnets: c.opt.Subnets}
	for _, o := range c.namespaces.GetStore().List() {
		ns := o.(*corev1.Namespace)
		st.Namespaces[ns.Name] = ns.Labels
	}
	for _, o := range c.policies.GetStore().List() {
		st.Policies = append(st.Policies, o.(*networkingv1.NetworkPolicy))
	}
	byKey := map[string]*Pod{}
	for _, o := range c.pods.GetStore().List() {
		if p := PodFrom(o.(*corev1.Pod)); p != nil {
			byKey[p.Key()] = p
		}
	}
	for k, o := range c.fetched {
		if _, ok := byKey[k]; !ok {
			if p := PodFrom(o); p != nil {
				byKey[k] = p
			}
		}
	}
	// Attachments are the truth about local addresses: they come before
	// the pod's status, and outlive a stale one.
	attachedTo := map[string][]netip.Addr{}
	for ip, a := range c.attached {
		p := byKey[a.key()]
		if p == nil || a.UID != "" && p.UID != a.UID {
			continue // pod gone or replaced: the address holds no pod
		}
		attachedTo[a.key()] = append(attachedTo[a.key()], ip)
	}
	taken := map[netip.Addr]bool{}
	for k, ips := range attachedTo {
		p := *byKey[k]
		p.IPs = ips
		p.Node = c.opt.Node
		byKey[k] = &p
		for _, ip := range ips {
			taken[ip] = true
		}
	}
	for _, p := range byKey {
		if p.HostNetwork {
			st.Pods = append(st.Pods, p)
			continue
		}
		var ips []netip.Addr
		for _, ip := range p.IPs {
			if taken[ip] && len(attachedTo[p.Key()]) == 0 {
				continue // a stale status: the address is another pod's now
			}
			ips = append(ips, ip)
		}
		q := *p
		q.IPs = ips
		st.Pods = append(st.Pods, &q)
		if q.Node != c.opt.Node {
			continue
		}
		for _, ip := range ips {
			if slices.ContainsFunc(c.opt.Subnets, func(s netip.Prefix) bool { return s.Contains(ip) }) {
				st.Local[ip] = &q
			}
		}
	}
	return st
}

// Attach records a pod the CNI plugin attached and returns once the table
// holds its rules: the pod's first packet meets its policy.
func (c *Controller) Attach(ctx context.Context, a api.Attachment) error {
	if a.Namespace == "" || a.Name == "" || len(a.IPs) == 0 {
		return fmt.Errorf("attachment needs namespace, name and addresses")
	}
	for _, ip := range a.IPs {
		if !slices.ContainsFunc(c.opt.Subnets, func(s netip.Prefix) bool { return s.Contains(ip) }) {
			return fmt.Errorf("address %s is not in this node's pod subnets %v", ip, c.opt.Subnets)
		}
	}
	key := a.Namespace + "/" + a.Name
	start := time.Now()
	uid, err := c.knowPod(ctx, a.Namespace, a.Name, types.UID(a.UID))
	if err != nil {
		return err
	}
	if err := c.policiesCurrent(ctx, a.Namespace); err != nil {
		return err
	}
	c.mu.Lock()
	for ip, old := range c.attached {
		if old.ContainerID == a.ContainerID && !slices.Contains(a.IPs, ip) {
			delete(c.attached, ip)
		}
	}
	for _, ip := range a.IPs {
		c.attached[ip.Unmap()] = attachment{Namespace: a.Namespace, Name: a.Name, UID: uid, ContainerID: a.ContainerID}
	}
	c.saveStateLocked()
	c.gen++
	want := c.gen
	c.mu.Unlock()
	select {
	case c.kick <- struct{}{}:
	default:
	}
	for {
		c.mu.Lock()
		done, ch := c.applied >= want, c.appliedCh
		c.mu.Unlock()
		if done {
			c.attachSeconds.Observe(time.Since(start).Seconds())
			c.log.Debug("pod attached; its rules are in place", "pod", key, "ips", a.IPs, "took", time.Since(start))
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("rules for pod %s not in place yet: %w", key, ctx.Err())
		}
	}
}

// knowPod makes sure the pod's labels are known: from the informer when
// it has this pod (same UID), else from the API server. It returns the
// UID the API server knows the pod by: a static pod's mirror has one of
// its own, not the one the kubelet gives the runtime.
func (c *Controller) knowPod(ctx context.Context, ns, name string, uid types.UID) (types.UID, error) {
	key := ns + "/" + name
	if o, ok, _ := c.pods.GetStore().GetByKey(key); ok {
		if p := o.(*corev1.Pod); uid == "" || p.UID == uid {
			return p.UID, nil
		}
	}
	p, err := c.opt.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return "", fmt.Errorf("pod %s: not found in the API server", key)
	}
	if err != nil {
		return "", fmt.Errorf("read pod %s (its labels decide its policy): %w", key, err)
	}
	if _, mirror := p.Annotations[corev1.MirrorPodAnnotationKey]; uid != "" && p.UID != uid && !mirror {
		return "", fmt.Errorf("pod %s: UID %s in the API server, the runtime attached %s", key, p.UID, uid)
	}
	s, _ := slim(p)
	c.mu.Lock()
	c.fetched[key] = s.(*corev1.Pod)
	c.mu.Unlock()
	return p.UID, nil
}

// policiesCurrent waits until the informer holds every NetworkPolicy of
// namespace ns as the API server has it now: a policy created just before
// the pod (and not yet seen by the informer) must meet the pod's first
// packet too.
func (c *Controller) policiesCurrent(ctx context.Context, ns string) error {
	lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	list, err := c.opt.Client.NetworkingV1().NetworkPolicies(ns).List(lctx, metav1.ListOptions{})
	cancel()
	if err != nil {
		// The API server away: the last known policies are the best there
		// is, as for every other pod (a sandbox recreated meanwhile must
		// still come up).
		c.log.Warn("cannot check the namespace's NetworkPolicies with the API server; the pod gets the last known ones", "namespace", ns, "err", err)
		return nil
	}
	for {
		behind := ""
		for _, want := range list.Items {
			o, ok, _ := c.policies.GetStore().GetByKey(ns + "/" + want.Name)
			if !ok || !atLeast(o.(*networkingv1.NetworkPolicy), &want) {
				behind = want.Name
				break
			}
		}
		if behind == "" {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("NetworkPolicy %s/%s not yet seen by tulled: %w", ns, behind, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// atLeast reports whether the cached policy is the listed one or newer
// (resource versions compare as numbers, as etcd's revisions do; when
// either is not a number, only the same version counts).
func atLeast(have, want *networkingv1.NetworkPolicy) bool {
	if have.UID != want.UID {
		return false
	}
	h, err1 := strconv.ParseUint(have.ResourceVersion, 10, 64)
	w, err2 := strconv.ParseUint(want.ResourceVersion, 10, 64)
	if err1 != nil || err2 != nil {
		return have.ResourceVersion == want.ResourceVersion
	}
	return h >= w
}

// Detach forgets a container's attachment (CNI DEL).
func (c *Controller) Detach(containerID string) {
	c.mu.Lock()
	n := len(c.attached)
	for ip, a := range c.attached {
		if a.ContainerID == containerID {
			delete(c.attached, ip)
		}
	}
	if len(c.attached) != n {
		c.saveStateLocked()
	}
	c.mu.Unlock()
	c.changed()
}

// pruneAttachments drops attachments of pods the API server no longer
// has (deleted while tulled was down).
func (c *Controller) pruneAttachments() {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := len(c.attached)
	for ip, a := range c.attached {
		o, ok, _ := c.pods.GetStore().GetByKey(a.key())
		if !ok || a.UID != "" && o.(*corev1.Pod).UID != a.UID {
			delete(c.attached, ip)
		}
	}
	if len(c.attached) != n {
		c.saveStateLocked()
	}
}

type savedAttachment struct {
	IP netip.Addr `json:"ip"`
	attachment
}

func (c *Controller) saveStateLocked() {
	if c.opt.StateFile == "" {
		return
	}
	var out []savedAttachment
	for ip, a := range c.attached {
		out = append(out, savedAttachment{ip, a})
	}
	slices.SortFunc(out, func(a, b savedAttachment) int { return a.IP.Compare(b.IP) })
	b, _ := json.Marshal(out)
	if err := atomicfile.Write(c.opt.StateFile, b, 0o600); err != nil {
		c.log.Warn("save pod attachments", "file", c.opt.StateFile, "err", err)
	}
}

func (c *Controller) loadState() {
	if c.opt.StateFile == "" {
		return
	}
	b, err := os.ReadFile(c.opt.StateFile)
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	var in []savedAttachment
	if err == nil {
		err = json.Unmarshal(b, &in)
	}
	if err != nil {
		c.log.Warn("pod attachments of the last run unreadable; pods are learnt from the API server", "file", c.opt.StateFile, "err", err)
		return
	}
	for _, s := range in {
		c.attached[s.IP] = s.attachment
	}
}

// Status returns the node's policy state.
func (c *Controller) Status() api.PolicyStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.status
	s.Synced = s.Synced && c.synced
	return s
}

// Ready reports whether the table reflects the API server (readiness).
func (c *Controller) Ready() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.status.Synced {
		return errors.New("NetworkPolicy rules not applied yet")
	}
	if c.status.Error != "" {
		return fmt.Errorf("NetworkPolicy rules: %s", c.status.Error)
	}
	return nil
}

// AttachSeconds is the histogram of ADD waits (a prometheus.Collector).
func (c *Controller) AttachSeconds() prometheus.Histogram { return c.attachSeconds }

// Dropped returns the packets the table dropped, by reason and policy.
func (c *Controller) Dropped(ctx context.Context) (Drops, error) {
	return c.table.Dropped(ctx)
}
