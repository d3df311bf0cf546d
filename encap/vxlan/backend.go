package vxlan

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/tulle-net/tulle/encap"
	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/tunnel"
)

// Name is the backend's name in net-conf, capabilities and status.
const Name = netconf.BackendVXLAN

// Caps is what a peer needs for VXLAN: the network identifier and port
// (both ends must agree) and the node's VTEP MAC. Userspace says the node
// speaks VXLAN from its datapath (Userspace) rather than through its
// kernel; absent, as tulleds before it published (and flannel), it is the
// kernel.
type Caps struct {
	VNI       int    `json:"vni"`
	Port      int    `json:"port"`
	MAC       string `json:"mac"`
	Userspace bool   `json:"userspace,omitempty"`
}

// Remote is a peer's VTEP: its underlay address in this node's VTEP
// family, and its MAC (encap.Path.Peer).
type Remote struct {
	VTEP netip.Addr
	MAC  net.HardwareAddr
}

// Backend is the VXLAN row of a table: through the kernel where a probe
// finds it (and --kernel-vxlan allows), else from the datapath.
type Backend struct {
	kernel *bool
}

var _ encap.Backend = (*Backend)(nil)

// NewBackend returns the VXLAN row of a table.
func NewBackend() *Backend { return &Backend{kernel: new(bool)} }

func (*Backend) Name() string      { return Name }
func (*Backend) Best() encap.Class { return encap.Kernel }

// AddFlags implements encap.Backend: --kernel-vxlan.
func (b *Backend) AddFlags(fs *flag.FlagSet) {
	fs.BoolVar(b.kernel, "kernel-vxlan", true, "use the kernel's VXLAN where a probe finds it (false, or no kernel VXLAN: tulled speaks VXLAN from its datapath)")
}

func (*Backend) Check(*netconf.Config) error { return nil }

// Cleanup implements encap.Backend: the kernel device, with its entries.
func (*Backend) Cleanup() error { return Cleanup(DeviceName) }

// Parse implements encap.Backend.
func (*Backend) Parse(raw json.RawMessage) (encap.Capability, error) {
	var v Caps
	if err := json.Unmarshal(raw, &v); err != nil {
		return nil, err
	}
	_, merr := net.ParseMAC(v.MAC)
	switch {
	case v.VNI < 1 || v.VNI > 1<<24-1:
		return nil, fmt.Errorf("VNI %d out of range", v.VNI)
	case v.Port < 1 || v.Port > 65535:
		return nil, fmt.Errorf("port %d out of range", v.Port)
	case merr != nil:
		return nil, fmt.Errorf("MAC %q: %v", v.MAC, merr)
	}
	return v, nil
}

// Reach implements encap.Capability. Both ends must agree on VNI and
// port; the tunnel runs in this node's primary underlay family. A path
// with a datapath at either end is a userspace one: udp, which a
// datapath moves faster, comes first in auto mode.
func (mine Caps) Reach(t encap.Capability, pair encap.Pair) (encap.Path, string) {
	theirs := t.(Caps)
	if mine.VNI != theirs.VNI || mine.Port != theirs.Port {
		return encap.Path{}, fmt.Sprintf("VNI/port differ (here %d/%d, peer %d/%d)", mine.VNI, mine.Port, theirs.VNI, theirs.Port)
	}
	vtep := pair.Primary()
	if !vtep.IsValid() {
		return encap.Path{}, "no peer underlay address in this node's VTEP family"
	}
	mac, _ := net.ParseMAC(theirs.MAC)
	p := encap.Path{Class: encap.Kernel, Peer: Remote{VTEP: vtep, MAC: mac}}
	switch {
	case mine.Userspace:
		p.Class, p.Slower = encap.Userspace, "this node's VXLAN is in userspace"
		p.Userspace, p.Endpoint, p.Note = true, netip.AddrPortFrom(vtep, uint16(theirs.Port)), "VXLAN in userspace"
	case theirs.Userspace:
		p.Class, p.Slower = encap.Userspace, "the peer's VXLAN is in userspace"
	}
	return p, ""
}

// Peers splits the peers of as between the kernel's device and the
// datapath (whichever this node speaks VXLAN with).
func Peers(as []encap.Assignment) (kernel []Peer, user []Endpoint) {
	for _, a := range as {
		r, _ := a.Path.Peer.(Remote)
		switch {
		case a.Userspace:
			user = append(user, Endpoint{Addr: a.Endpoint, MAC: r.MAC})
		case len(a.Subnets) > 0:
			kernel = append(kernel, Peer{Subnets: a.Subnets, VTEP: r.VTEP, MAC: r.MAC})
		}
	}
	return kernel, user
}

// Start implements encap.Backend: with Backend.Type auto or vxlan.
func (b *Backend) Start(env encap.Env) (encap.Running, error) {
	t, log, u := env.Net.Backend.Type, env.Logger, env.Underlay
	if t != netconf.BackendAuto && t != Name {
		return nil, nil
	}
	r := &running{caps: Caps{VNI: env.Net.Backend.VNI, Port: int(env.Net.Backend.VXLANPort), MAC: MACFor(env.Node).String()}, v6: u.Primary6()}
	perr := errors.New("turned off by --kernel-vxlan=false")
	if *b.kernel {
		perr = Probe()
	}
	if perr == nil {
		vtep := u.IP4
		if !vtep.IsValid() {
			vtep = u.IP6
		}
		r.kernel = New(Config{VNI: r.caps.VNI, Port: r.caps.Port, Underlay: u.Iface, VTEP: vtep, MAC: MACFor(env.Node),
			MTU: u.MTU - Overhead(r.v6), Networks: env.Networks})
		return r, nil
	}
	r.caps.Userspace = true
	if gone, err := RemoveFormer(DeviceName, r.caps.Port); err != nil {
		log.Warn("remove the kernel VXLAN device of an earlier run", "device", DeviceName, "err", err)
	} else if gone {
		log.Info("removed the kernel VXLAN device of an earlier run: VXLAN is in userspace now", "device", DeviceName)
	}
	var err error
	r.user, err = NewUserspace(UserspaceConfig{VNI: r.caps.VNI, Port: r.caps.Port, MAC: MACFor(env.Node), Local4: u.IP4, Local6: u.IP6,
		MTU: u.MTU, DisableGSO: env.DisableGSO, DisableGRO: env.DisableGRO, Counters: &r.ctr, Logger: log})
	switch {
	case err != nil && t == Name:
		return nil, netconf.Errorf("net-conf field Backend.Type: vxlan: no kernel VXLAN (%v), and VXLAN in userspace cannot start: %v", perr, err)
	case err != nil:
		log.Warn("no VXLAN: no kernel VXLAN, and VXLAN in userspace cannot start; peers are reached over host-gw or udp", "kernel", perr, "err", err)
		return nil, nil
	}
	log.Info("VXLAN in userspace", "why", perr)
	return r, nil
}

// running is VXLAN on a node: the kernel's device or the datapath's.
type running struct {
	caps   Caps
	v6     bool
	kernel *Kernel    // nil in userspace
	user   *Userspace // nil in the kernel
	ctr    Counters
}

func (r *running) Capability() encap.Capability { return r.caps }

func (r *running) Transport() encap.Transport {
	if r.user == nil {
		return nil
	}
	return r.user
}

func (r *running) Kernel() tunnel.KernelPath {
	if r.kernel == nil {
		return nil
	}
	return r.kernel
}

func (r *running) Sizes(underlayMTU int) (int, int) { return underlayMTU - Overhead(r.v6), 0 }

func (r *running) Attach(subnets []netip.Prefix) error {
	if r.kernel != nil {
		r.kernel.SetLocal(subnets)
	}
	return nil
}

func (r *running) SetPeers(as []encap.Assignment) {
	kernel, user := Peers(as)
	if r.kernel != nil {
		r.kernel.SetPeers(kernel)
	}
	if r.user != nil {
		r.user.SetPeers(user)
	}
}

func (r *running) SetMTU(underlayMTU int) {
	if r.kernel != nil {
		r.kernel.SetMTU(underlayMTU - Overhead(r.v6))
	}
	if r.user != nil {
		r.user.SetMTU(underlayMTU)
	}
}

func (r *running) Counters() encap.Counters {
	m := map[string]uint64{}
	r.ctr.SnapshotInto(m)
	return encap.Counters{Component: Name, Prefix: "vxlan_", Values: m}
}

// Close releases the datapath's sockets; the kernel's device stays, with
// its entries, for the next run.
func (r *running) Close() error {
	if r.user != nil {
		return r.user.Close()
	}
	return nil
}

// SetLocal replaces this node's subnets (the device's addresses); the next
// Reconcile applies them.
func (k *Kernel) SetLocal(local []netip.Prefix) {
	k.mu.Lock()
	k.cfg.Local = slices.Clone(local)
	k.mu.Unlock()
}
