package udp

import (
	"encoding/json"
	"errors"
	"flag"
	"net/netip"

	"github.com/tulle-net/tulle/encap"
	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/lease"
	"github.com/tulle-net/tulle/tunnel"
)

// Name is the backend's name in net-conf, capabilities and status.
const Name = netconf.BackendUDP

// Caps is what a peer needs to reach a node over udp.
type Caps struct {
	Port uint16 `json:"port"`
}

// Backend is the udp backend: every node that does not encrypt speaks
// it, and it carries any peer the kernel paths cannot (yet).
type Backend struct{}

var (
	_ encap.Backend = Backend{}
	_ encap.Legacy  = Backend{}
)

// NewBackend returns the udp row of a table.
func NewBackend() Backend { return Backend{} }

func (Backend) Name() string                { return Name }
func (Backend) Best() encap.Class           { return encap.Userspace }
func (Backend) AddFlags(*flag.FlagSet)      {}
func (Backend) Check(*netconf.Config) error { return nil }
func (Backend) Cleanup() error              { return nil }

// Parse implements encap.Backend.
func (Backend) Parse(raw json.RawMessage) (encap.Capability, error) {
	var c Caps
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, err
	}
	if c.Port == 0 {
		return nil, errors.New("no port")
	}
	return c, nil
}

// FromLegacy implements encap.Legacy: tulleds before capabilities spoke
// udp alone.
func (Backend) FromLegacy(b lease.Backend) (encap.Capability, bool) {
	if b.Type != Name || b.Port == 0 {
		return nil, false
	}
	return Caps{Port: b.Port}, true
}

// Reach implements encap.Capability.
func (Caps) Reach(theirs encap.Capability, pair encap.Pair) (encap.Path, string) {
	ep := pair.Endpoint(theirs.(Caps).Port)
	if !ep.IsValid() {
		return encap.Path{}, "no underlay address in a family this node has"
	}
	return encap.Path{Class: encap.Userspace, Endpoint: ep, Fallback: true}, ""
}

// Start implements encap.Backend: every node that does not encrypt
// speaks udp. Its sockets, on net-conf's port, are bound by Attach, once
// the node holds its lease: a second tulled of one name on a host is
// refused its lease rather than the port.
func (Backend) Start(env encap.Env) (encap.Running, error) {
	r := &running{port: env.Net.Backend.Port, v6: env.Underlay.Primary6()}
	r.opt = Options{MTU: env.Underlay.MTU, Accept: env.Accept, DisableGSO: env.DisableGSO, DisableGRO: env.DisableGRO,
		Counters: &r.ctr, Logger: env.Logger}
	if ip := env.Underlay.IP4; ip.IsValid() {
		r.opt.Local4 = netip.AddrPortFrom(ip, r.port)
	}
	if ip := env.Underlay.IP6; ip.IsValid() {
		r.opt.Local6 = netip.AddrPortFrom(ip, r.port)
	}
	return r, nil
}

type running struct {
	port uint16
	v6   bool
	opt  Options
	t    *Transport // from Attach on
	ctr  Counters
}

func (r *running) Attach([]netip.Prefix) error {
	t, err := New(r.opt)
	if err != nil {
		return err
	}
	r.t = t
	return nil
}

func (r *running) Transport() encap.Transport {
	if r.t == nil {
		return nil
	}
	return r.t
}

func (r *running) SetMTU(underlayMTU int) {
	if r.t != nil {
		r.t.SetMTU(underlayMTU)
	}
}

func (r *running) Close() error {
	if r.t == nil {
		return nil
	}
	return r.t.Close()
}

func (r *running) Capability() encap.Capability { return Caps{Port: r.port} }
func (r *running) Kernel() tunnel.KernelPath    { return nil }
func (r *running) SetPeers([]encap.Assignment)  {} // it reaches any endpoint the datapath names

func (r *running) Sizes(underlayMTU int) (int, int) {
	return InnerMTU(underlayMTU, r.v6), MaxFrame(underlayMTU, r.v6)
}

func (r *running) Counters() encap.Counters {
	m := map[string]uint64{}
	r.ctr.SnapshotInto(m)
	return encap.Counters{Component: Name, Values: m}
}
