package tunnel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// RouteProtocol marks the routes tulled installs (rtm_protocol), so cleanup
// removes exactly those and nobody else's.
const RouteProtocol = netlink.RouteProtocol(116)

// ReconcileInterval is how often the router re-checks its state even without
// a netlink event.
const ReconcileInterval = 5 * time.Second

// RouterConfig is the kernel state tulled owns for its TUN device.
type RouterConfig struct {
	Link string
	// Underlay is the interface the overlay runs over. When set, the
	// device's MTU and GSO cap follow its MTU (through Size), and
	// readiness requires it up with the Public addresses on it.
	Underlay string
	Public   []netip.Addr
	// Size returns the device MTU and GSO cap for an underlay MTU.
	Size func(underlayMTU int) (mtu, gsoMax int)
	// OnResize is called from the reconcile loop when the underlay MTU
	// changed, with the new sizes, before the device is changed: the owner
	// resizes what sends datagrams first, so nothing in flight is too big.
	OnResize func(underlayMTU, mtu, gsoMax int)
	// MTU and GSOMaxSize are the device's sizes (from Size when Underlay
	// is set). GSOMaxSize caps super-packets so a frame fits one UDP GSO
	// send.
	MTU        int
	GSOMaxSize int
	// Local are this node's subnets; the first address of each is put on
	// the device, so traffic the node itself sends into the overlay has a
	// source peers accept.
	Local []netip.Prefix
	// Networks are the cluster networks routed to the device.
	Networks []netip.Prefix
	// Kernel are kernel backends' states (a VXLAN device and its entries)
	// reconciled and checked with the router's own, on the same events.
	Kernel []KernelPath
	Logger *slog.Logger
}

// KernelPath is a kernel backend's state: Reconcile repairs it and says
// what it changed, Check says, without changing anything, why it cannot
// carry traffic now.
type KernelPath interface {
	Reconcile() ([]string, error)
	Check() error
}

// Router keeps the TUN link up, its MTU, addresses and routes as configured,
// repairing whatever someone else changes. It only ever touches the link it
// is given and routes through it.
type Router struct {
	mu          sync.Mutex // Reconcile, Check and SetPeerRoutes
	cfg         RouterConfig
	peerRoutes  []PeerRoute
	peersKnown  bool // SetPeerRoutes was called: stale peer routes may go
	log         *slog.Logger
	noLLOn      int // index of the link addr_gen_mode none was applied to
	underlayMTU int
}

// NewRouter returns a router; call Reconcile once, then Run.
func NewRouter(cfg RouterConfig) *Router {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Router{cfg: cfg, log: cfg.Logger.With("link", cfg.Link)}
}

func hostPrefix(a netip.Addr) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// SetPeerRoutes replaces the set of peer routes; the next Reconcile adds
// what is missing and removes tulle's peer routes that are no longer
// wanted. Until the first call nothing is removed, so a restarted tulled
// does not flap the routes its predecessor left.
func (r *Router) SetPeerRoutes(routes []PeerRoute) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.peerRoutes, r.peersKnown = slices.Clone(routes), true
}

// MTU returns the device MTU the router currently enforces.
func (r *Router) MTU() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cfg.MTU
}

// followUnderlay picks up an underlay MTU change.
func (r *Router) followUnderlay() ([]string, error) {
	if r.cfg.Underlay == "" || r.cfg.Size == nil {
		return nil, nil
	}
	ul, err := netlink.LinkByName(r.cfg.Underlay)
	if err != nil {
		return nil, fmt.Errorf("underlay %s: %w", r.cfg.Underlay, err)
	}
	um := ul.Attrs().MTU
	if um == r.underlayMTU {
		return nil, nil
	}
	mtu, gso := r.cfg.Size(um)
	if mtu < 576 {
		return nil, fmt.Errorf("underlay %s MTU %d is too small for the overlay", r.cfg.Underlay, um)
	}
	old := r.underlayMTU
	r.underlayMTU = um
	if old == 0 && mtu == r.cfg.MTU {
		return nil, nil // first look: as configured
	}
	if r.cfg.OnResize != nil {
		r.cfg.OnResize(um, mtu, gso)
	}
	r.cfg.MTU, r.cfg.GSOMaxSize = mtu, gso
	return []string{fmt.Sprintf("underlay mtu %d→%d: device mtu %d", old, um, mtu)}, nil
}

// Reconcile brings the kernel to the configured state and reports what it
// had to repair.
func (r *Router) Reconcile() (repaired []string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if repaired, err = r.followUnderlay(); err != nil {
		return repaired, err
	}
	link, err := netlink.LinkByName(r.cfg.Link)
	if err != nil {
		return repaired, fmt.Errorf("link %s: %w", r.cfg.Link, err)
	}
	attrs := link.Attrs()
	if r.noLLOn != attrs.Index {
		// No IPv6 link-local address on the TUN: nothing there speaks
		// neighbour discovery, and without it the kernel sends no router
		// solicitations or MLD reports that no peer could take.
		const in6AddrGenModeNone = 1
		if err := netlink.LinkSetIP6AddrGenMode(link, in6AddrGenModeNone); err != nil {
			r.log.Debug("set addr_gen_mode none", "err", err)
		}
		r.noLLOn = attrs.Index
	}
	if attrs.MTU != r.cfg.MTU {
		if err := netlink.LinkSetMTU(link, r.cfg.MTU); err != nil {
			return repaired, fmt.Errorf("set mtu %d on %s: %w", r.cfg.MTU, r.cfg.Link, err)
		}
		repaired = append(repaired, fmt.Sprintf("mtu %d→%d", attrs.MTU, r.cfg.MTU))
	}
	if r.cfg.GSOMaxSize > 0 && int(attrs.GSOMaxSize) != r.cfg.GSOMaxSize {
		if err := netlink.LinkSetGSOMaxSize(link, r.cfg.GSOMaxSize); err != nil {
			r.log.Debug("set gso_max_size", "err", err) // an optimisation only
		}
	}
	if attrs.Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(link); err != nil {
			return repaired, fmt.Errorf("set %s up: %w", r.cfg.Link, err)
		}
		repaired = append(repaired, "link up")
	}
	for _, p := range r.cfg.Local {
		fam := netlink.FAMILY_V4
		if p.Addr().Is6() {
			fam = netlink.FAMILY_V6
		}
		have, err := netlink.AddrList(link, fam)
		if err != nil {
			return repaired, fmt.Errorf("list addresses of %s: %w", r.cfg.Link, err)
		}
		want := hostPrefix(p.Addr())
		found := false
		for _, a := range have {
			if a.IPNet.String() == want.String() {
				found = true
			}
		}
		if !found {
			a := &netlink.Addr{IPNet: want}
			if p.Addr().Is6() {
				a.Flags = unix.IFA_F_NODAD // no DAD on a point-to-point TUN
			}
			if err := netlink.AddrReplace(link, a); err != nil {
				return repaired, fmt.Errorf("add address %s to %s: %w", want, r.cfg.Link, err)
			}
			repaired = append(repaired, "address "+want.String())
		}
	}
	for _, n := range r.cfg.Networks {
		route := r.route(attrs.Index, n)
		ok, err := routePresent(route, n)
		if err != nil {
			return repaired, err
		}
		if ok {
			continue
		}
		if err := netlink.RouteReplace(route); err != nil {
			return repaired, fmt.Errorf("route %s via %s: %w", n, r.cfg.Link, err)
		}
		repaired = append(repaired, "route "+n.String())
	}
	fixed, err := r.reconcilePeerRoutes()
	repaired = append(repaired, fixed...)
	if err != nil {
		return repaired, err
	}
	for _, k := range r.cfg.Kernel {
		fixed, err := k.Reconcile()
		repaired = append(repaired, fixed...)
		if err != nil {
			return repaired, err
		}
	}
	return repaired, nil
}

// peerRoute is the kernel form of p on the underlay link.
func (r *Router) peerRoute(index int, p PeerRoute) *netlink.Route {
	rt := r.route(index, p.Dst)
	rt.Gw = p.Via.AsSlice()
	return rt
}

func samePeerRoute(a, b *netlink.Route) bool {
	return a.LinkIndex == b.LinkIndex && a.Protocol == b.Protocol && a.Gw.Equal(b.Gw)
}

// tulleRoutesOn returns tulle's routes (protocol 116, main table) through
// link index idx, by destination: one dump per family, so reconciling and
// checking thousands of peer routes stays linear.
func tulleRoutesOn(idx int) (map[netip.Prefix]netlink.Route, error) {
	out := map[netip.Prefix]netlink.Route{}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		cur, err := netlink.RouteListFiltered(fam, &netlink.Route{LinkIndex: idx, Protocol: RouteProtocol, Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_OIF|netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
		if err != nil {
			return nil, fmt.Errorf("list tulle routes: %w", err)
		}
		for _, c := range cur {
			if c.Dst == nil {
				continue
			}
			if dst, ok := netipPrefix(c.Dst); ok {
				out[dst] = c
			}
		}
	}
	return out, nil
}

// reconcilePeerRoutes installs the wanted peer routes and removes tulle's
// stale ones on the underlay.
func (r *Router) reconcilePeerRoutes() (repaired []string, err error) {
	if r.cfg.Underlay == "" || (len(r.peerRoutes) == 0 && !r.peersKnown) {
		return nil, nil
	}
	ul, err := netlink.LinkByName(r.cfg.Underlay)
	if err != nil {
		return nil, fmt.Errorf("underlay %s: %w", r.cfg.Underlay, err)
	}
	idx := ul.Attrs().Index
	cur, err := tulleRoutesOn(idx)
	if err != nil {
		return nil, err
	}
	want := map[netip.Prefix]bool{}
	for _, p := range r.peerRoutes {
		want[p.Dst] = true
		rt := r.peerRoute(idx, p)
		if c, ok := cur[p.Dst]; ok && samePeerRoute(&c, rt) {
			continue
		}
		if err := netlink.RouteReplace(rt); err != nil {
			return repaired, fmt.Errorf("route %s via %s: %w", p.Dst, p.Via, err)
		}
		repaired = append(repaired, fmt.Sprintf("route %s via %s", p.Dst, p.Via))
	}
	if !r.peersKnown {
		return repaired, nil
	}
	for dst, c := range cur {
		// Only routes into this tulled's own cluster networks are its to
		// remove: another tulled on the host (another network) owns its own.
		if want[dst] || !inNetworks(dst, r.cfg.Networks) {
			continue
		}
		if err := netlink.RouteDel(&c); err != nil && !errors.Is(err, unix.ESRCH) {
			return repaired, fmt.Errorf("delete stale route %s: %w", dst, err)
		}
		repaired = append(repaired, "removed stale route "+dst.String())
	}
	return repaired, nil
}

// inNetworks reports whether p lies inside one of networks.
func inNetworks(p netip.Prefix, networks []netip.Prefix) bool {
	return slices.ContainsFunc(networks, func(n netip.Prefix) bool { return n.Contains(p.Addr()) && p.Bits() >= n.Bits() })
}

func netipPrefix(n *net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}

// routePresent reports whether the main table has route (to n) as tulled
// installs it.
func routePresent(route *netlink.Route, n netip.Prefix) (bool, error) {
	cur, err := netlink.RouteListFiltered(family(n), &netlink.Route{Dst: route.Dst, Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_DST|netlink.RT_FILTER_TABLE)
	if err != nil {
		return false, fmt.Errorf("list routes to %s: %w", n, err)
	}
	for _, c := range cur {
		if c.LinkIndex == route.LinkIndex && c.Src.Equal(route.Src) && c.Protocol == RouteProtocol {
			return true, nil
		}
	}
	return false, nil
}

// Check reports, without changing anything, why the kernel state is not
// what forwarding needs right now: the device missing, down or of the wrong
// MTU, an address or route missing, the underlay down or without its
// addresses. Readiness is this, live.
func (r *Router) Check() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cfg.Underlay != "" {
		ul, err := netlink.LinkByName(r.cfg.Underlay)
		if err != nil {
			return fmt.Errorf("underlay %s: %w", r.cfg.Underlay, err)
		}
		if ul.Attrs().Flags&net.FlagUp == 0 {
			return fmt.Errorf("underlay %s is down", r.cfg.Underlay)
		}
		addrs, err := netlink.AddrList(ul, netlink.FAMILY_ALL)
		if err != nil {
			return fmt.Errorf("addresses of %s: %w", r.cfg.Underlay, err)
		}
		for _, p := range r.cfg.Public {
			if !slices.ContainsFunc(addrs, func(a netlink.Addr) bool { ip, _ := netip.AddrFromSlice(a.IP); return ip.Unmap() == p }) {
				return fmt.Errorf("underlay %s lost address %s", r.cfg.Underlay, p)
			}
		}
	}
	link, err := netlink.LinkByName(r.cfg.Link)
	if err != nil {
		return fmt.Errorf("device %s: %w", r.cfg.Link, err)
	}
	attrs := link.Attrs()
	switch {
	case attrs.Flags&net.FlagUp == 0:
		return fmt.Errorf("device %s is down", r.cfg.Link)
	case attrs.MTU != r.cfg.MTU:
		return fmt.Errorf("device %s has MTU %d, want %d", r.cfg.Link, attrs.MTU, r.cfg.MTU)
	}
	for _, p := range r.cfg.Local {
		addrs, err := netlink.AddrList(link, family(p))
		if err != nil {
			return fmt.Errorf("addresses of %s: %w", r.cfg.Link, err)
		}
		want := hostPrefix(p.Addr()).String()
		if !slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return a.IPNet.String() == want }) {
			return fmt.Errorf("device %s lacks address %s", r.cfg.Link, want)
		}
	}
	for _, n := range r.cfg.Networks {
		ok, err := routePresent(r.route(attrs.Index, n), n)
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("route %s via %s missing", n, r.cfg.Link)
		}
	}
	if len(r.peerRoutes) > 0 {
		ul, err := netlink.LinkByName(r.cfg.Underlay)
		if err != nil {
			return fmt.Errorf("underlay %s: %w", r.cfg.Underlay, err)
		}
		cur, err := tulleRoutesOn(ul.Attrs().Index)
		if err != nil {
			return err
		}
		for _, p := range r.peerRoutes {
			if c, ok := cur[p.Dst]; !ok || !samePeerRoute(&c, r.peerRoute(ul.Attrs().Index, p)) {
				return fmt.Errorf("route %s via %s missing", p.Dst, p.Via)
			}
		}
	}
	for _, k := range r.cfg.Kernel {
		if err := k.Check(); err != nil {
			return err
		}
	}
	return nil
}

func family(p netip.Prefix) int {
	if p.Addr().Is4() {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

func (r *Router) route(index int, n netip.Prefix) *netlink.Route {
	rt := &netlink.Route{LinkIndex: index, Dst: ipNet(n), Protocol: RouteProtocol, Scope: netlink.SCOPE_UNIVERSE, Table: unix.RT_TABLE_MAIN}
	for _, p := range r.cfg.Local {
		if p.Addr().Is4() == n.Addr().Is4() {
			rt.Src = p.Addr().AsSlice()
		}
	}
	return rt
}

// Run reconciles on every link, address or route change and every
// ReconcileInterval until ctx ends. A deleted route or address comes back
// within milliseconds, an underlay MTU change is followed at once; a
// deleted device is recreated by its reader (ReopeningTUN), which kicks.
func (r *Router) Run(ctx context.Context, kick <-chan struct{}) {
	done := make(chan struct{})
	defer close(done)
	events := make(chan struct{}, 1)
	notify := func() {
		select {
		case events <- struct{}{}:
		default:
		}
	}
	lu, au, ru := make(chan netlink.LinkUpdate, 16), make(chan netlink.AddrUpdate, 16), make(chan netlink.RouteUpdate, 16)
	subErr := errors.Join(
		netlink.LinkSubscribe(lu, done),
		netlink.AddrSubscribe(au, done),
		netlink.RouteSubscribe(ru, done),
	)
	if subErr != nil {
		r.log.Warn("netlink subscribe failed; reconciling on a timer only", "err", subErr)
	}
	go func() {
		for {
			select {
			case _, ok := <-lu:
				if !ok {
					lu = nil
				}
			case _, ok := <-au:
				if !ok {
					au = nil
				}
			case _, ok := <-ru:
				if !ok {
					ru = nil
				}
			case <-done:
				return
			}
			notify()
		}
	}()
	t := time.NewTicker(ReconcileInterval)
	defer t.Stop()
	var lastErr string
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-events:
		case <-kick:
		}
		repaired, err := r.Reconcile()
		if len(repaired) > 0 {
			r.log.Info("repaired kernel state", "what", repaired)
		}
		if err != nil && err.Error() != lastErr {
			r.log.Warn("reconcile", "err", err)
		}
		lastErr = ""
		if err != nil {
			lastErr = err.Error()
		}
	}
}

// Cleanup removes every route tulled installed (route protocol 116) to
// destinations inside the cluster networks, through the TUN or any kernel
// path, and the TUN itself. What is already gone counts as removed.
func Cleanup(link string, networks []netip.Prefix) error {
	var errs []error
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Protocol: RouteProtocol, Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
		if err != nil {
			errs = append(errs, fmt.Errorf("list tulle routes: %w", err))
			continue
		}
		for _, rt := range routes {
			if rt.Dst == nil {
				continue
			}
			dst, ok := netipPrefix(rt.Dst)
			if !ok || !inNetworks(dst, networks) {
				continue
			}
			if err := netlink.RouteDel(&rt); err != nil && !errors.Is(err, unix.ESRCH) {
				errs = append(errs, fmt.Errorf("delete route %s: %w", dst, err))
			}
		}
	}
	if err := DeleteTUN(link); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
