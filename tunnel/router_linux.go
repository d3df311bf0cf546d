package tunnel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
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
	MTU  int
	// GSOMaxSize caps super-packets so a frame fits one UDP GSO send.
	GSOMaxSize int
	// Local are this node's subnets; the first address of each is put on
	// the device, so traffic the node itself sends into the overlay has a
	// source peers accept.
	Local []netip.Prefix
	// Networks are the cluster networks routed to the device.
	Networks []netip.Prefix
	Logger   *slog.Logger
}

// Router keeps the TUN link up, its MTU, addresses and routes as configured,
// repairing whatever someone else changes. It only ever touches the link it
// is given and routes through it.
type Router struct {
	cfg     RouterConfig
	log     *slog.Logger
	noLLSet bool // addr_gen_mode none applied once this process
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

// Reconcile brings the kernel to the configured state and reports what it
// had to repair.
func (r *Router) Reconcile() (repaired []string, err error) {
	link, err := netlink.LinkByName(r.cfg.Link)
	if err != nil {
		return nil, fmt.Errorf("link %s: %w", r.cfg.Link, err)
	}
	attrs := link.Attrs()
	if !r.noLLSet {
		// No IPv6 link-local address on the TUN: nothing there speaks
		// neighbour discovery, and without it the kernel sends no router
		// solicitations or MLD reports that no peer could take.
		const in6AddrGenModeNone = 1
		if err := netlink.LinkSetIP6AddrGenMode(link, in6AddrGenModeNone); err != nil {
			r.log.Debug("set addr_gen_mode none", "err", err)
		}
		r.noLLSet = true
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
		cur, err := netlink.RouteListFiltered(family(n), &netlink.Route{Dst: route.Dst, Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_DST|netlink.RT_FILTER_TABLE)
		if err != nil {
			return repaired, fmt.Errorf("list routes to %s: %w", n, err)
		}
		ok := false
		for _, c := range cur {
			if c.LinkIndex == attrs.Index && c.Src.Equal(route.Src) && c.Protocol == RouteProtocol {
				ok = true
			}
		}
		if ok {
			continue
		}
		if err := netlink.RouteReplace(route); err != nil {
			return repaired, fmt.Errorf("route %s via %s: %w", n, r.cfg.Link, err)
		}
		repaired = append(repaired, "route "+n.String())
	}
	return repaired, nil
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
// within milliseconds; a deleted device is the datapath's to recreate.
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

// Cleanup removes the routes tulled installed through link and the link
// itself. What is already gone counts as removed.
func Cleanup(link string, networks []netip.Prefix) error {
	var errs []error
	if l, err := netlink.LinkByName(link); err == nil {
		for _, n := range networks {
			routes, err := netlink.RouteListFiltered(family(n), &netlink.Route{LinkIndex: l.Attrs().Index, Dst: ipNet(n)}, netlink.RT_FILTER_OIF|netlink.RT_FILTER_DST)
			if err != nil {
				errs = append(errs, fmt.Errorf("list routes to %s: %w", n, err))
				continue
			}
			for _, rt := range routes {
				if rt.Protocol != RouteProtocol {
					continue
				}
				if err := netlink.RouteDel(&rt); err != nil && !errors.Is(err, unix.ESRCH) {
					errs = append(errs, fmt.Errorf("delete route %s: %w", n, err))
				}
			}
		}
	}
	if err := DeleteTUN(link); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
