package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	ktypes "k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"

	"github.com/tulle-net/tulle/lease"
)

// Condition tulle sets on its Node.
const (
	conditionReason  = "TulleIsUp"
	conditionMessage = "tulle is running on this node"
)

// farFuture is the expiry of a podcidr-mode lease: the subnet is the
// Node's for as long as the Node exists.
var farFuture = time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC)

// nodeSubnets returns the Node's pod CIDRs that the configured network
// enables, checked against it.
func (s *Store) nodeSubnets(n *corev1.Node) (v4, v6 netip.Prefix, err error) {
	cidrs := n.Spec.PodCIDRs
	if len(cidrs) == 0 && n.Spec.PodCIDR != "" {
		cidrs = []string{n.Spec.PodCIDR}
	}
	for _, c := range cidrs {
		p, perr := netip.ParsePrefix(c)
		if perr != nil {
			return v4, v6, fmt.Errorf("malformed podCIDR %q", c)
		}
		if p.Addr().Is4() && !s.opt.Net.EnableIPv4 || p.Addr().Is6() && !s.opt.Net.EnableIPv6 {
			continue
		}
		if err := s.opt.Net.CheckSubnet(p); err != nil {
			return v4, v6, fmt.Errorf("podCIDR %w", err)
		}
		if p.Addr().Is4() {
			v4 = p
		} else {
			v6 = p
		}
	}
	if s.opt.Net.EnableIPv4 && !v4.IsValid() || s.opt.Net.EnableIPv6 && !v6.IsValid() {
		return v4, v6, errors.New("no podCIDR for every enabled family yet")
	}
	return v4, v6, nil
}

// claimPodCIDR waits for the Node's pod CIDRs, then publishes attrs on it.
func (s *Store) claimPodCIDR(ctx context.Context, node string, attrs lease.Attrs) (lease.Lease, error) {
	var l lease.Lease
	waiting := false
	err := s.retry(ctx, "node "+node, func(ctx context.Context) error {
		n, err := s.opt.Client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			if !waiting {
				s.log.Info("waiting for the Node object", "node", node)
				waiting = true
			}
			return err
		}
		if err != nil {
			return err
		}
		v4, v6, err := s.nodeSubnets(n)
		if err != nil {
			if !waiting {
				s.log.Info("waiting for the node's pod CIDRs", "node", node, "reason", err)
				waiting = true
			}
			return err
		}
		l = lease.Lease{Node: node, Subnet: v4, IPv6Subnet: v6, Attrs: attrs, Expiration: farFuture}
		return s.publishNode(ctx, node, attrs)
	})
	if err != nil {
		return lease.Lease{}, err
	}
	s.setAPIErr(nil)
	s.log.Info("lease from the node's pod CIDRs", "node", node, "subnet", l.Subnet, "ipv6Subnet", l.IPv6Subnet)
	return l, nil
}

// publishNode patches tulle's annotations and the NetworkUnavailable
// condition through nodes/status (one patch, one permission).
func (s *Store) publishNode(ctx context.Context, node string, attrs lease.Attrs) error {
	now := metav1.Now()
	patch := map[string]any{
		"metadata": map[string]any{"annotations": encodeAttrs(attrs)},
		"status": map[string]any{"conditions": []map[string]any{{
			"type": string(corev1.NodeNetworkUnavailable), "status": string(corev1.ConditionFalse),
			"reason": conditionReason, "message": conditionMessage,
			"lastTransitionTime": now, "lastHeartbeatTime": now,
		}}},
	}
	b, err := json.Marshal(patch)
	if err != nil {
		return err
	}
	_, err = s.opt.Client.CoreV1().Nodes().Patch(ctx, node, ktypes.StrategicMergePatchType, b, metav1.PatchOptions{}, "status")
	return err
}

// renewPodCIDR republishes the annotations (a no-op patch when unchanged)
// and checks that the Node still has the same pod CIDRs.
func (s *Store) renewPodCIDR(ctx context.Context, l lease.Lease) (lease.Lease, error) {
	n, err := s.opt.Client.CoreV1().Nodes().Get(ctx, l.Node, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return l, fmt.Errorf("node %s: %w (Node deleted)", l.Node, lease.ErrLost)
	}
	if err != nil {
		return l, err
	}
	if v4, v6, err := s.nodeSubnets(n); err == nil && (v4 != l.Subnet || v6 != l.IPv6Subnet) {
		return l, fmt.Errorf("node %s: %w (pod CIDRs changed to %s %s)", l.Node, lease.ErrLost, v4, v6)
	}
	// No expiry in this mode (the Node is the lease); Renewed says when
	// the Node was last checked and its annotations republished.
	l.Renewed = time.Now()
	if sameAnnotations(n.Annotations, encodeAttrs(l.Attrs)) && hasCondition(n) {
		return l, nil
	}
	return l, s.publishNode(ctx, l.Node, l.Attrs)
}

func sameAnnotations(have, want map[string]string) bool {
	for k, v := range want {
		if have[k] != v {
			return false
		}
	}
	return true
}

func hasCondition(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeNetworkUnavailable {
			return c.Status == corev1.ConditionFalse && c.Reason == conditionReason
		}
	}
	return false
}

// releasePodCIDR removes tulle's annotations from the Node.
func (s *Store) releasePodCIDR(ctx context.Context, l lease.Lease) error {
	ann := map[string]any{}
	for _, k := range []string{AnnPublicIP, AnnPublicIPv6, AnnBackendType, AnnBackendData} {
		ann[k] = nil
	}
	b, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": ann}})
	_, err := s.opt.Client.CoreV1().Nodes().Patch(ctx, l.Node, ktypes.MergePatchType, b, metav1.PatchOptions{}, "status")
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

// slimNode is the informer transform: only what tulle reads survives, so
// thousands of 15 kB Node objects cost a few hundred bytes each.
func slimNode(obj any) (any, error) {
	n, ok := obj.(*corev1.Node)
	if !ok {
		return obj, nil // tombstones pass through
	}
	ann := map[string]string{}
	for k, v := range n.Annotations {
		if strings.HasPrefix(k, annPrefix) {
			ann[k] = v
		}
	}
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: n.Name, UID: n.UID, ResourceVersion: n.ResourceVersion, Annotations: ann},
		Spec:       corev1.NodeSpec{PodCIDR: n.Spec.PodCIDR, PodCIDRs: n.Spec.PodCIDRs},
	}, nil
}

// watchNodes delivers peers from every other Node with pod CIDRs and tulle
// annotations.
func (s *Store) watchNodes(ctx context.Context, self string) (<-chan []lease.Peer, error) {
	// The list goes page by page (500 Nodes) and each page is slimmed before
	// the next is fetched, so only one page of full Node objects is ever in
	// memory (the watch cache would answer resourceVersion=0 with every
	// Node at once, and the reflector's pager keeps all pages until it is
	// done). Measured with 5000 Nodes: see docs/benchmarks.md.
	nodes := s.opt.Client.CoreV1().Nodes()
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			if o.ResourceVersion == "0" {
				o.ResourceVersion = ""
			}
			o.Limit, o.Continue = 500, ""
			out := &corev1.NodeList{}
			for {
				page, err := nodes.List(ctx, o)
				if err != nil {
					return nil, err
				}
				if out.ResourceVersion == "" {
					out.ListMeta = page.ListMeta
				}
				for i := range page.Items {
					slim, _ := slimNode(&page.Items[i])
					out.Items = append(out.Items, *slim.(*corev1.Node))
				}
				if page.Continue == "" {
					out.Continue = ""
					return out, nil
				}
				o.Continue, o.ResourceVersion = page.Continue, ""
			}
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			return nodes.Watch(ctx, o)
		},
	}
	inf := cache.NewSharedIndexInformer(lw, &corev1.Node{}, 0, cache.Indexers{})
	if err := inf.SetTransform(slimNode); err != nil {
		return nil, err
	}
	sn := newSnapshotter(func() []lease.Peer {
		var out []lease.Peer
		owner := map[netip.Prefix]string{}
		for _, obj := range inf.GetStore().List() {
			n := obj.(*corev1.Node)
			if n.Name == self {
				continue
			}
			p, err := s.nodePeer(n)
			if err != nil {
				s.warnOnce("node/"+n.Name, err.Error())
				continue
			}
			if other, dup := firstOverlap(owner, p); dup {
				s.warnOnce("node/"+n.Name, "pod CIDR overlaps node "+other)
				continue
			}
			s.clearWarning("node/" + n.Name)
			for _, sub := range p.Subnets() {
				owner[sub] = n.Name
			}
			out = append(out, p)
		}
		return out
	})
	return s.startInformer(ctx, func() { go inf.Run(ctx.Done()) }, inf, sn, 0)
}

// firstOverlap reports a node already owning one of p's subnets. Nodes are
// visited in informer order; overlaps are a misconfiguration, logged once.
func firstOverlap(owner map[netip.Prefix]string, p lease.Peer) (string, bool) {
	for _, sub := range p.Subnets() {
		if o, ok := owner[sub]; ok {
			return o, true
		}
	}
	return "", false
}

func (s *Store) nodePeer(n *corev1.Node) (lease.Peer, error) {
	v4, v6, err := s.nodeSubnets(n)
	if err != nil {
		return lease.Peer{}, err
	}
	attrs, err := decodeAttrs(n.Annotations)
	if err != nil {
		return lease.Peer{}, err
	}
	return lease.Peer{Node: n.Name, Subnet: v4, IPv6Subnet: v6, Attrs: attrs, Expiration: farFuture}, nil
}

// startInformer runs the informer, reports API health from its watch, and
// starts the snapshotter once the cache has synced.
func (s *Store) startInformer(ctx context.Context, start func(), inf cache.SharedIndexInformer, sn *snapshotter, tick time.Duration) (<-chan []lease.Peer, error) {
	inf.SetWatchErrorHandler(func(_ *cache.Reflector, err error) { s.setAPIErr(err) })
	h := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { s.setAPIErr(nil); sn.changed() },
		UpdateFunc: func(old, cur any) { sn.changed() },
		DeleteFunc: func(any) { sn.changed() },
	}
	if _, err := inf.AddEventHandler(h); err != nil {
		return nil, err
	}
	start()
	go s.probe(ctx)
	go func() {
		if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
			return
		}
		s.mu.Lock()
		s.synced = true
		s.mu.Unlock()
		sn.changed()
		sn.run(ctx, tick)
	}()
	return sn.ch, nil
}

// probe checks the API server's /readyz every ProbeInterval: client-go's
// reflector retries a refused watch silently, so without a probe a dead API
// server would look healthy until the next renewal.
func (s *Store) probe(ctx context.Context) {
	t := time.NewTicker(s.opt.ProbeInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := s.opt.Client.Discovery().RESTClient().Get().AbsPath("/readyz").Do(pctx).Error()
		cancel()
		if ctx.Err() != nil {
			return
		}
		s.mu.Lock()
		synced := s.synced
		s.mu.Unlock()
		if err != nil || synced {
			s.setAPIErr(err)
		}
	}
}
