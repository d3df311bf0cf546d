// Package kube is the Kubernetes lease store: tulled's node subnet and its
// peers come from the API server through client-go.
//
// Two modes:
//
//   - ModePodCIDR (flannel's kube mode): the subnets are Node.spec.podCIDRs,
//     allocated by the controller-manager. tulled publishes its peer data as
//     tulle.dev/ annotations on its own Node (through the nodes/status
//     subresource) and sets the NetworkUnavailable condition to False
//     (reason TulleIsUp).
//   - ModeLease: for clusters that do not allocate node CIDRs. tulled claims
//     a subnet of the configured network with a coordination.k8s.io/v1 Lease
//     per subnet in its namespace: created atomically (the API server's
//     create is the lock), held by the node name, renewed, taken over with a
//     resourceVersion precondition once expired. Peer data travels as
//     annotations on the Lease. With dual-stack the i-th IPv6 subnet goes
//     with the i-th IPv4 subnet, so one Lease holds both.
//
// Peers are watched through a shared informer whose transform keeps only
// what tulle reads (name, tulle.dev/ annotations, pod CIDRs; or the Lease
// spec), so memory stays small with thousands of Nodes. Snapshots are
// rebuilt at most every SnapshotDelay and only sent when they change, so
// informer resyncs never churn routes. The store never deletes anything but
// its own Lease and annotations.
package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/kubernetes"

	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/lease"
)

// Mode selects where subnets come from.
type Mode string

// Modes.
const (
	ModePodCIDR Mode = "podcidr"
	ModeLease   Mode = "lease"
)

// Annotation keys tulle publishes (on Nodes in podcidr mode, on Leases in
// lease mode).
const (
	AnnPublicIP    = "tulle.dev/public-ip"
	AnnPublicIPv6  = "tulle.dev/public-ipv6"
	AnnBackendType = "tulle.dev/backend-type"
	AnnBackendData = "tulle.dev/backend-data"
	AnnBackends    = "tulle.dev/backends"
	AnnSubnet      = "tulle.dev/subnet"
	AnnIPv6Subnet  = "tulle.dev/ipv6-subnet"
	annPrefix      = "tulle.dev/"
)

// SnapshotDelay bounds how often a burst of informer events rebuilds the
// peer set.
const SnapshotDelay = 100 * time.Millisecond

// Options configure a Store.
type Options struct {
	Client kubernetes.Interface
	Net    *netconf.Config
	Mode   Mode
	// Namespace holds the Lease objects (lease mode).
	Namespace string
	// TTL is the Lease duration (lease mode); renewal is the caller's, at
	// TTL/3.
	TTL time.Duration
	// ProbeInterval is how often the API server's /readyz is checked for
	// Ready (DefaultProbeInterval if zero).
	ProbeInterval time.Duration
	Logger        *slog.Logger
	// Now is the clock (time.Now if nil); tests move it.
	Now func() time.Time
}

// DefaultProbeInterval keeps the probe load at 1/3 of a kubelet's node
// lease renewals.
const DefaultProbeInterval = 30 * time.Second

// Store implements lease.Store on the Kubernetes API.
type Store struct {
	opt Options
	log *slog.Logger

	mu     sync.Mutex
	warned map[string]string // object → last reason logged
	apiErr error             // last watch error, nil once the watch recovered
	synced bool

	renewals renewals // lease mode: when this node saw each Lease renewed
}

var _ lease.Store = (*Store)(nil)

// New returns a store; it does not contact the API server yet.
func New(opt Options) (*Store, error) {
	if opt.Client == nil || opt.Net == nil {
		return nil, errors.New("kube lease store: client and network config are required")
	}
	switch opt.Mode {
	case "":
		opt.Mode = ModePodCIDR
	case ModePodCIDR, ModeLease:
	default:
		return nil, fmt.Errorf("kube lease store: unknown mode %q (want %s or %s)", opt.Mode, ModePodCIDR, ModeLease)
	}
	if opt.Mode == ModeLease {
		if opt.Namespace == "" {
			return nil, errors.New("kube lease store: lease mode needs a namespace")
		}
		if opt.TTL <= 0 {
			opt.TTL = time.Hour
		}
		c := opt.Net
		if c.EnableIPv4 && c.EnableIPv6 && netconf.SubnetCount(c.IPv6SubnetMin, c.IPv6SubnetMax, c.IPv6SubnetLen) < netconf.SubnetCount(c.SubnetMin, c.SubnetMax, c.SubnetLen) {
			return nil, errors.New("kube lease store: lease mode pairs the i-th IPv6 subnet with the i-th IPv4 subnet, so the IPv6 range needs at least as many subnets as the IPv4 range")
		}
	}
	if opt.Logger == nil {
		opt.Logger = slog.Default()
	}
	if opt.ProbeInterval <= 0 {
		opt.ProbeInterval = DefaultProbeInterval
	}
	if opt.Now == nil {
		opt.Now = time.Now
	}
	return &Store{opt: opt, log: opt.Logger.With("store", "kube", "mode", string(opt.Mode)), warned: map[string]string{},
		renewals: renewals{now: opt.Now, seen: map[string]sighting{}}}, nil
}

// Ready reports why the store is not ready: the API server was not reached
// yet or its watch is failing. The datapath keeps its last peers meanwhile.
func (s *Store) Ready() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.apiErr != nil {
		return fmt.Errorf("kubernetes API: %w", s.apiErr)
	}
	if !s.synced {
		return errors.New("kubernetes API: peers not synced yet")
	}
	return nil
}

func (s *Store) setAPIErr(err error) {
	s.mu.Lock()
	changed := (s.apiErr == nil) != (err == nil)
	s.apiErr = err
	s.mu.Unlock()
	switch {
	case changed && apierrors.IsForbidden(err):
		// RBAC, or deploy/node-identity.yaml: a token bound to a pod on
		// another node than --node-name says.
		s.log.Error("kubernetes API refuses tulled; forwarding with the last known peers (is --node-name the node this pod runs on?)", "err", err)
	case changed && err != nil:
		s.log.Warn("kubernetes API unreachable; forwarding with the last known peers", "err", err)
	case changed:
		s.log.Info("kubernetes API reachable again")
	}
}

// warnOnce logs a problem with one object once per distinct reason.
func (s *Store) warnOnce(object, reason string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.warned[object] == reason {
		return
	}
	s.warned[object] = reason
	s.log.Warn("ignoring peer", "object", object, "reason", reason)
}

func (s *Store) clearWarning(object string) {
	s.mu.Lock()
	delete(s.warned, object)
	s.mu.Unlock()
}

// backendData is the JSON in AnnBackendData.
type backendData struct {
	Port uint16          `json:"port,omitempty"`
	Data json.RawMessage `json:"data,omitempty"`
}

// encodeAttrs renders attrs as annotations.
func encodeAttrs(a lease.Attrs) map[string]string {
	m := map[string]string{AnnBackendType: a.Backend.Type}
	bd, _ := json.Marshal(backendData{Port: a.Backend.Port, Data: a.Backend.Data})
	m[AnnBackendData] = string(bd)
	if a.PublicIP.IsValid() {
		m[AnnPublicIP] = a.PublicIP.String()
	}
	if a.PublicIPv6.IsValid() {
		m[AnnPublicIPv6] = a.PublicIPv6.String()
	}
	if len(a.Backends) > 0 {
		b, _ := json.Marshal(a.Backends)
		m[AnnBackends] = string(b)
	}
	return m
}

// decodeAttrs parses peer annotations; the error says what is wrong.
func decodeAttrs(ann map[string]string) (lease.Attrs, error) {
	var a lease.Attrs
	t, ok := ann[AnnBackendType]
	if !ok {
		return a, errors.New("no " + AnnBackendType + " annotation (tulled not running there yet?)")
	}
	if !contains(netconf.Backends(), t) {
		return a, fmt.Errorf("unknown backend %q", t)
	}
	a.Backend.Type = t
	var bd backendData
	if err := json.Unmarshal([]byte(ann[AnnBackendData]), &bd); err != nil {
		return a, fmt.Errorf("malformed %s: %v", AnnBackendData, err)
	}
	a.Backend.Port, a.Backend.Data = bd.Port, bd.Data
	if a.Backend.Port == 0 {
		return a, fmt.Errorf("%s has no port", AnnBackendData)
	}
	for key, dst := range map[string]*netip.Addr{AnnPublicIP: &a.PublicIP, AnnPublicIPv6: &a.PublicIPv6} {
		if v, ok := ann[key]; ok {
			ip, err := netip.ParseAddr(v)
			if err != nil || ip.Is4() != (key == AnnPublicIP) {
				return a, fmt.Errorf("malformed %s %q", key, v)
			}
			*dst = ip
		}
	}
	if !a.PublicIP.IsValid() && !a.PublicIPv6.IsValid() {
		return a, errors.New("no public address annotation")
	}
	if v, ok := ann[AnnBackends]; ok {
		if err := json.Unmarshal([]byte(v), &a.Backends); err != nil {
			return a, fmt.Errorf("malformed %s: %v", AnnBackends, err)
		}
	}
	return a, nil
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// snapshotter turns "something changed" signals into debounced peer
// snapshots on a channel that holds only the newest one.
type snapshotter struct {
	build func() []lease.Peer
	ch    chan []lease.Peer
	kick  chan struct{}
}

func newSnapshotter(build func() []lease.Peer) *snapshotter {
	return &snapshotter{build: build, ch: make(chan []lease.Peer, 1), kick: make(chan struct{}, 1)}
}

func (sn *snapshotter) changed() {
	select {
	case sn.kick <- struct{}{}:
	default:
	}
}

// run delivers a snapshot whenever a kick (or tick, for expiry) produces a
// different peer set.
func (sn *snapshotter) run(ctx context.Context, tick time.Duration) {
	var last []lease.Peer
	first := true
	var t <-chan time.Time
	if tick > 0 {
		tk := time.NewTicker(tick)
		defer tk.Stop()
		t = tk.C
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-sn.kick:
			// Let a burst of events land before rebuilding.
			select {
			case <-ctx.Done():
				return
			case <-time.After(SnapshotDelay):
			}
		case <-t:
		}
		cur := sn.build()
		lease.SortPeers(cur)
		if !first && lease.PeersEqual(cur, last) {
			continue
		}
		first, last = false, cur
		select {
		case <-sn.ch:
		default:
		}
		sn.ch <- cur
	}
}

// retry runs fn until it succeeds or ctx ends, backing off from 200 ms to
// 10 s; it reports the API as unreachable meanwhile.
func (s *Store) retry(ctx context.Context, what string, fn func(context.Context) error) error {
	delay := 200 * time.Millisecond
	for {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := fn(cctx)
		cancel()
		if err == nil {
			return nil
		}
		var perm permanent
		if errors.As(err, &perm) {
			return perm.err
		}
		s.setAPIErr(fmt.Errorf("%s: %w", what, err))
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w (last error: %v)", what, ctx.Err(), err)
		case <-time.After(delay):
		}
		delay = min(delay*2, 10*time.Second)
	}
}

// permanent marks an error retry must not retry.
type permanent struct{ err error }

func (p permanent) Error() string { return p.err.Error() }
