package node

import (
	"errors"
	"log/slog"
	"net/netip"

	"github.com/tulle-net/tulle/encap"
	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/lease"
	"github.com/tulle-net/tulle/tunnel"
)

// speaking is one backend running on this node.
type speaking struct {
	name string
	encap.Running
}

// speakers are the backends running on this node, in the table's order.
type speakers []speaking

// startBackends starts every backend of the table this node speaks. A
// backend of class Forced that net-conf names is the only one started:
// a node that encrypts speaks nothing else, so no peer ever reaches it in
// plaintext. accept is the datapath's peer lookup by endpoint.
func startBackends(c Config, u encap.Underlay, accept func(netip.AddrPort) *tunnel.Peer, log *slog.Logger) (speakers, error) {
	env := encap.Env{Node: c.Node, Net: c.Net, Underlay: u, DisableGSO: c.DisableGSO, DisableGRO: c.DisableGRO,
		Accept: func(a netip.AddrPort) bool { return accept(a) != nil }, Networks: networks(c.Net), Logger: log}
	only := ""
	if b, ok := c.Backends.Lookup(c.Net.Backend.Type); ok && b.Best() == encap.Forced {
		only = b.Name()
	}
	var sp speakers
	for _, b := range c.Backends {
		if only != "" && b.Name() != only {
			continue
		}
		r, err := b.Start(env)
		if err != nil {
			sp.Close()
			return nil, err
		}
		if r != nil {
			sp = append(sp, speaking{b.Name(), r})
		}
	}
	if len(sp) == 0 {
		return nil, netconf.Errorf("net-conf field Backend.Type: %s: this node can speak none of the backends it allows", c.Net.Backend.Type)
	}
	if mtu, _ := sp.sizes(u.MTU); mtu < 1280 && c.Net.EnableIPv6 {
		sp.Close()
		return nil, netconf.Errorf("interface %s: MTU %d leaves less than IPv6's minimum 1280 inside the overlay", u.Iface, u.MTU)
	}
	return sp, nil
}

// caps are the capabilities this node publishes.
func (sp speakers) caps() map[string]encap.Capability {
	m := map[string]encap.Capability{}
	for _, s := range sp {
		m[s.name] = s.Capability()
	}
	return m
}

// names are the backends this node speaks, in preference order.
func (sp speakers) names(t encap.Table) []string { return t.Names(sp.caps()) }

// local is what Select knows of this node.
func (sp speakers) local(mode string, u encap.Underlay) encap.Local {
	return encap.Local{Mode: mode, Caps: sp.caps(), IP4: u.IP4, IP6: u.IP6, OnLink: u.OnLink}
}

// attrs are what the node's lease says of it: its underlay, its
// capabilities, and for tulleds from before capabilities the one Legacy
// backend it speaks (else net-conf's type).
func (sp speakers) attrs(t encap.Table, n *netconf.Config, u encap.Underlay) lease.Attrs {
	legacy := n.Backend.Type
	for _, s := range sp {
		if b, _ := t.Lookup(s.name); b != nil {
			if _, ok := b.(encap.Legacy); ok {
				legacy = s.name
				break
			}
		}
	}
	return lease.Attrs{PublicIP: u.IP4, PublicIPv6: u.IP6, Backend: lease.Backend{Type: legacy, Port: n.Backend.Port}, Backends: encap.Publish(sp.caps())}
}

// sizes are the TUN MTU and GSO cap for an underlay MTU: the smallest of
// the paths this node speaks, so pods' packets fit whichever serves a
// peer.
func (sp speakers) sizes(underlayMTU int) (mtu, gsoMax int) {
	mtu, gsoMax = underlayMTU, tunnel.MaxPacket
	for _, s := range sp {
		m, g := s.Sizes(underlayMTU)
		if m > 0 {
			mtu = min(mtu, m)
		}
		if g > 0 {
			gsoMax = min(gsoMax, g)
		}
	}
	return mtu, gsoMax
}

// transport is the datapath's transport: the running backends' userspace
// paths behind one Mux, the first (in the table's order: udp) taking
// what no other serves; encap.None when none moves packets itself.
func (sp speakers) transport() (*encap.Mux, bool) {
	var ts []encap.Transport
	for _, s := range sp {
		if t := s.Transport(); t != nil {
			ts = append(ts, t)
		}
	}
	if len(ts) == 0 {
		return encap.NewMux(encap.None{}), false
	}
	return encap.NewMux(ts[0], ts[1:]...), true
}

// kernel are the running backends' kernel states, for the router.
func (sp speakers) kernel() []tunnel.KernelPath {
	var ks []tunnel.KernelPath
	for _, s := range sp {
		if k := s.Kernel(); k != nil {
			ks = append(ks, k)
		}
	}
	return ks
}

// program gives each backend its peers of a programme, and returns the
// routes the backends want through the kernel.
func (sp speakers) program(pr encap.Programme) []tunnel.PeerRoute {
	var routes []tunnel.PeerRoute
	for _, s := range sp {
		s.SetPeers(pr.ByBackend[s.name])
		if r, ok := s.Running.(encap.Router); ok {
			routes = append(routes, r.PeerRoutes()...)
		}
	}
	return routes
}

func (sp speakers) attach(subnets []netip.Prefix) error {
	for _, s := range sp {
		if err := s.Attach(subnets); err != nil {
			return err
		}
	}
	return nil
}

func (sp speakers) setMTU(underlayMTU int) {
	for _, s := range sp {
		s.SetMTU(underlayMTU)
	}
}

// counters are every backend's counters.
func (sp speakers) counters() []encap.Counters {
	cs := make([]encap.Counters, 0, len(sp))
	for _, s := range sp {
		cs = append(cs, s.Counters())
	}
	return cs
}

// report lets each backend add what it has to say to the status.
func (sp speakers) report(doc *api.Status) {
	for _, s := range sp {
		if r, ok := s.Running.(encap.Reporter); ok {
			r.Report(doc)
		}
	}
}

// rotator is the backend with a key to rotate, if any.
func (sp speakers) rotator() encap.Rotator {
	for _, s := range sp {
		if r, ok := s.Running.(encap.Rotator); ok {
			return r
		}
	}
	return nil
}

// Close closes every running backend.
func (sp speakers) Close() error {
	var errs []error
	for _, s := range sp {
		errs = append(errs, s.Running.Close())
	}
	return errors.Join(errs...)
}
