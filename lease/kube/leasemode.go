package kube

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"math/big"
	"net/netip"
	"strings"
	"sync"
	"time"

	coordv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"

	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/lease"
)

// leaseName names the Lease of a subnet: "tulle-100-96-3-0-24",
// "tulle-fd00-96-0-3---64" (IPv6-only clusters).
func leaseName(p netip.Prefix) string {
	r := strings.NewReplacer(".", "-", ":", "-", "/", "-")
	return "tulle-" + strings.Trim(r.Replace(p.String()), "-")
}

// subnetIndex pairs IPv6 subnets with IPv4 ones in dual-stack lease mode.
func (s *Store) pair(i int) lease.Lease {
	c := s.opt.Net
	var l lease.Lease
	if c.EnableIPv4 {
		l.Subnet = netconf.SubnetAt(c.SubnetMin, c.SubnetLen, i)
	}
	if c.EnableIPv6 {
		l.IPv6Subnet = netconf.SubnetAt(c.IPv6SubnetMin, c.IPv6SubnetLen, i)
	}
	return l
}

func (s *Store) subnetCount() int {
	c := s.opt.Net
	if c.EnableIPv4 {
		return netconf.SubnetCount(c.SubnetMin, c.SubnetMax, c.SubnetLen)
	}
	return netconf.SubnetCount(c.IPv6SubnetMin, c.IPv6SubnetMax, c.IPv6SubnetLen)
}

// toLease reads a Lease object; ok is false for objects that are not tulle
// leases or are malformed (err says why).
func (s *Store) toLease(o *coordv1.Lease) (lease.Lease, error) {
	var l lease.Lease
	if o.Spec.HolderIdentity == nil || *o.Spec.HolderIdentity == "" {
		return l, errors.New("no holder")
	}
	l.Node = *o.Spec.HolderIdentity
	for key, dst := range map[string]*netip.Prefix{AnnSubnet: &l.Subnet, AnnIPv6Subnet: &l.IPv6Subnet} {
		v, ok := o.Annotations[key]
		if !ok {
			continue
		}
		p, err := netip.ParsePrefix(v)
		if err != nil {
			return l, fmt.Errorf("malformed %s %q", key, v)
		}
		if err := s.opt.Net.CheckSubnet(p); err != nil {
			return l, err
		}
		*dst = p
	}
	if !l.Key().IsValid() || leaseName(l.Key()) != o.Name {
		return l, errors.New("subnet annotation does not match the Lease name")
	}
	if s.opt.Net.EnableIPv4 != l.Subnet.IsValid() || s.opt.Net.EnableIPv6 != l.IPv6Subnet.IsValid() {
		return l, errors.New("subnet families do not match the network config")
	}
	attrs, err := decodeAttrs(o.Annotations)
	if err != nil {
		return l, err
	}
	l.Attrs = attrs
	l.Expiration = s.renewals.expiry(o)
	if t := renewTime(o); t != nil {
		l.Renewed = t.Time
	}
	return l, nil
}

func renewTime(o *coordv1.Lease) *metav1.MicroTime {
	if o.Spec.RenewTime != nil {
		return o.Spec.RenewTime
	}
	return o.Spec.AcquireTime
}

func leaseDuration(o *coordv1.Lease) time.Duration {
	if o.Spec.LeaseDurationSeconds == nil {
		return 0
	}
	return time.Duration(*o.Spec.LeaseDurationSeconds) * time.Second
}

// renewals judges Lease expiry by this node's clock, the way client-go's
// leader election does: a Lease expires its duration after this store
// first saw its current renewal (holder and renew time), whatever the
// holder's clock says. A holder whose clock runs behind is not taken over
// while it renews; one whose clock runs ahead does not hold a subnet longer.
type renewals struct {
	mu   sync.Mutex
	now  func() time.Time
	seen map[string]sighting // by Lease name
}

type sighting struct {
	mark string    // holder and renew time as the object says
	at   time.Time // when this store first saw that mark
}

// expiry returns when o expires by this node's observation.
func (r *renewals) expiry(o *coordv1.Lease) time.Time {
	mark := ptrString(o.Spec.HolderIdentity)
	if t := renewTime(o); t != nil {
		mark += "@" + t.UTC().Format(time.RFC3339Nano)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	s, ok := r.seen[o.Name]
	if !ok || s.mark != mark {
		s = sighting{mark: mark, at: r.now()}
		r.seen[o.Name] = s
	}
	return s.at.Add(leaseDuration(o))
}

// retain forgets the Leases that are gone.
func (r *renewals) retain(names map[string]bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for n := range r.seen {
		if !names[n] {
			delete(r.seen, n)
		}
	}
}

func (s *Store) leaseObject(l lease.Lease, base *coordv1.Lease) *coordv1.Lease {
	o := &coordv1.Lease{}
	if base != nil {
		o = base.DeepCopy()
	}
	o.Name = leaseName(l.Key())
	o.Namespace = s.opt.Namespace
	if o.Labels == nil {
		o.Labels = map[string]string{}
	}
	o.Labels["app.kubernetes.io/managed-by"] = "tulle"
	o.Annotations = encodeAttrs(l.Attrs)
	if l.Subnet.IsValid() {
		o.Annotations[AnnSubnet] = l.Subnet.String()
	}
	if l.IPv6Subnet.IsValid() {
		o.Annotations[AnnIPv6Subnet] = l.IPv6Subnet.String()
	}
	now := metav1.NewMicroTime(s.opt.Now())
	holder := l.Node
	secs := int32(s.opt.TTL.Round(time.Second) / time.Second)
	if base == nil || base.Spec.HolderIdentity == nil || *base.Spec.HolderIdentity != l.Node {
		o.Spec.AcquireTime = &now
		trans := int32(0)
		if base != nil && base.Spec.LeaseTransitions != nil {
			trans = *base.Spec.LeaseTransitions + 1
		}
		o.Spec.LeaseTransitions = &trans
	}
	o.Spec.HolderIdentity = &holder
	o.Spec.RenewTime = &now
	o.Spec.LeaseDurationSeconds = &secs
	return o
}

// claimLease returns the node's Lease, or takes a free or expired subnet.
// The API server arbitrates: Create fails for an existing name, Update fails
// on a stale resourceVersion; the loser picks again.
func (s *Store) claimLease(ctx context.Context, node string, attrs lease.Attrs) (lease.Lease, error) {
	var got lease.Lease
	err := s.retry(ctx, "claim lease", func(ctx context.Context) error {
		leases := s.opt.Client.CoordinationV1().Leases(s.opt.Namespace)
		list, err := leases.List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		now := s.opt.Now()
		used := map[string]*coordv1.Lease{}
		names := map[string]bool{}
		for i := range list.Items {
			names[list.Items[i].Name] = true
		}
		s.renewals.retain(names)
		for i := range list.Items {
			o := &list.Items[i]
			used[o.Name] = o
			if o.Spec.HolderIdentity != nil && *o.Spec.HolderIdentity == node {
				l, err := s.toLease(o)
				if err != nil {
					continue // not a usable lease of ours: claim afresh
				}
				if l.HeldByOther(attrs, leaseDuration(o), now) {
					return permanent{lease.InUseError(&l, attrs, now)}
				}
				l.Attrs = attrs
				upd, err := leases.Update(ctx, s.leaseObject(l, o), metav1.UpdateOptions{})
				if err != nil {
					return err
				}
				got = l
				got.Renewed = renewTime(upd).Time
				got.Expiration = s.renewals.expiry(upd)
				s.log.Info("lease reacquired", "node", node, "subnet", l.Subnet, "ipv6Subnet", l.IPv6Subnet, "lease", o.Name)
				return nil
			}
		}
		n := s.subnetCount()
		start := 0
		if r, err := rand.Int(rand.Reader, big.NewInt(int64(n))); err == nil {
			start = int(r.Int64())
		}
		unseen := 0 // expired by their holders' clocks, not yet by ours
		for k := range n {
			cand := s.pair((start + k) % n)
			cand.Node, cand.Attrs = node, attrs
			name := leaseName(cand.Key())
			old, taken := used[name]
			if taken && s.renewals.expiry(old).After(now) {
				if t := renewTime(old); t != nil && !t.Add(leaseDuration(old)).After(now) {
					unseen++
				}
				continue
			}
			var obj *coordv1.Lease
			if taken {
				obj, err = leases.Update(ctx, s.leaseObject(cand, old), metav1.UpdateOptions{})
			} else {
				obj, err = leases.Create(ctx, s.leaseObject(cand, nil), metav1.CreateOptions{})
			}
			if apierrors.IsAlreadyExists(err) || apierrors.IsConflict(err) {
				continue // someone else won this one
			}
			if err != nil {
				return err
			}
			if taken {
				s.log.Info("expired lease taken over", "lease", name, "was", ptrString(old.Spec.HolderIdentity), "by", node)
			}
			got = cand
			got.Renewed = renewTime(obj).Time
			got.Expiration = s.renewals.expiry(obj)
			s.log.Info("lease claimed", "node", node, "subnet", cand.Subnet, "ipv6Subnet", cand.IPv6Subnet, "lease", name)
			return nil
		}
		if unseen > 0 {
			// Retried: these become free once this node has seen them
			// go unrenewed for their whole duration.
			return fmt.Errorf("every subnet is held; %d Leases look expired by their holders' clocks and are taken over once unrenewed for their duration by this node's", unseen)
		}
		return permanent{fmt.Errorf("claim in %s: %w", s.opt.Namespace, lease.ErrExhausted)}
	})
	if err != nil {
		return lease.Lease{}, err
	}
	s.setAPIErr(nil)
	return got, nil
}

func ptrString(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}

// renewLease extends the node's Lease; ErrLost if someone else holds it.
func (s *Store) renewLease(ctx context.Context, l lease.Lease) (lease.Lease, error) {
	leases := s.opt.Client.CoordinationV1().Leases(s.opt.Namespace)
	o, err := leases.Get(ctx, leaseName(l.Key()), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return l, fmt.Errorf("lease %s: %w (deleted)", leaseName(l.Key()), lease.ErrLost)
	}
	if err != nil {
		return l, err
	}
	if ptrString(o.Spec.HolderIdentity) != l.Node {
		return l, fmt.Errorf("lease %s: %w (held by %s)", o.Name, lease.ErrLost, ptrString(o.Spec.HolderIdentity))
	}
	upd, err := leases.Update(ctx, s.leaseObject(l, o), metav1.UpdateOptions{})
	if apierrors.IsConflict(err) {
		return l, fmt.Errorf("lease %s: changed under us, will retry: %w", o.Name, err)
	}
	if err != nil {
		return l, err
	}
	l.Renewed = renewTime(upd).Time
	l.Expiration = s.renewals.expiry(upd)
	return l, nil
}

// releaseLease deletes the node's Lease if it still holds it.
func (s *Store) releaseLease(ctx context.Context, l lease.Lease) error {
	leases := s.opt.Client.CoordinationV1().Leases(s.opt.Namespace)
	o, err := leases.Get(ctx, leaseName(l.Key()), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	if ptrString(o.Spec.HolderIdentity) != l.Node {
		return nil
	}
	err = leases.Delete(ctx, o.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &o.UID, ResourceVersion: &o.ResourceVersion}})
	if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
		return nil
	}
	return err
}

// watchLeases delivers peers from every other node's live Lease. A tick
// re-evaluates expiry, which no event announces.
func (s *Store) watchLeases(ctx context.Context, self string) (<-chan []lease.Peer, error) {
	factory := informers.NewSharedInformerFactoryWithOptions(s.opt.Client, 0, informers.WithNamespace(s.opt.Namespace))
	inf := factory.Coordination().V1().Leases().Informer()
	sn := newSnapshotter(func() []lease.Peer {
		var out []lease.Peer
		now := s.opt.Now()
		names := map[string]bool{}
		for _, obj := range inf.GetStore().List() {
			o := obj.(*coordv1.Lease)
			names[o.Name] = true
			if !strings.HasPrefix(o.Name, "tulle-") {
				continue
			}
			l, err := s.toLease(o)
			if err != nil {
				s.warnOnce("lease/"+o.Name, err.Error())
				continue
			}
			s.clearWarning("lease/" + o.Name)
			if l.Node == self || !l.Expiration.After(now) {
				continue
			}
			out = append(out, l)
		}
		s.renewals.retain(names)
		return out
	})
	tick := min(max(s.opt.TTL/10, time.Second), 30*time.Second)
	return s.startInformer(ctx, func() { factory.Start(ctx.Done()) }, inf, sn, tick)
}
