// Package vxlan is tulle's VXLAN backend, in two forms that speak one wire
// format (RFC 7348, flannel's L3 model) and so form one cluster:
//
// Kernel: one VXLAN device, programmed per peer the way flannel's vxlan
// backend does it, so the kernel carries the traffic and tulled moves no
// packets:
//
//	FDB entry        peer VTEP MAC → peer underlay address   (bridge fdb, permanent)
//	neighbour entry  peer gateway → peer VTEP MAC (permanent)
//	route            peer subnet via peer gateway dev <vxlan> onlink (route protocol 116)
//
// The IPv4 gateway is the peer subnet's first address, as flannel has it.
// The IPv6 gateway is a link-local address derived from the peer's VTEP MAC
// (EUI-64): Linux refuses an onlink IPv6 gateway that another device's route
// covers ("device mismatch"), and tulled's cluster route through its TUN
// covers every peer subnet; link-local gateways are exempt. The gateway is
// local to this node, so peers (flannel's among them) never see it.
//
// The package owns its device and every entry on it, and nothing else. A
// peer that leaves takes its entries with it; the device (and so every
// entry) goes with Cleanup.
//
// Userspace: when this node's kernel has no VXLAN (or it is turned off),
// Userspace speaks the same datagrams from tulled's datapath, a
// tunnel.Transport: to a peer's kernel the node looks like one more VXLAN
// device (VTEP MAC and address published in its lease).
package vxlan

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/tunnel"
)

// Defaults: flannel's, so operators recognise them.
const (
	DefaultVNI  = 1
	DefaultPort = 8472
	// DeviceName is the VXLAN device tulled creates.
	DeviceName = "tulle-vx0"
)

// Overhead is what VXLAN adds to an inner packet on an underlay of the
// given family: outer IP + UDP + VXLAN + inner Ethernet.
func Overhead(v6 bool) int {
	if v6 {
		return 40 + 8 + 8 + 14
	}
	return 20 + 8 + 8 + 14
}

// Probe reports whether this kernel can make VXLAN devices, by making one
// and removing it: never assumed from the kernel version. The probe device
// takes a random VNI, so it does not collide with VXLAN devices already
// there (a VNI and port pair is the kernel's key); a collision all the
// same (EEXIST) proves the kernel has VXLAN.
func Probe() error {
	var rnd [3]byte
	rand.Read(rnd[:])
	name := "tlvxp" + hex.EncodeToString(rnd[:])
	vni := 1<<23 + int(rnd[0])<<8 | int(rnd[1])
	l := &netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: name}, VxlanId: vni, Port: DefaultPort}
	if err := netlink.LinkAdd(l); errors.Is(err, unix.EEXIST) {
		return nil
	} else if err != nil {
		return fmt.Errorf("create a VXLAN device: %w", err)
	}
	if err := netlink.LinkDel(l); err != nil {
		return fmt.Errorf("remove the probe VXLAN device %s: %w", name, err)
	}
	return nil
}

// MACFor is the stable VTEP MAC of a node: locally administered, unicast,
// the same across restarts so peers' FDB and neighbour entries stay right.
func MACFor(node string) net.HardwareAddr {
	h := sha256.Sum256([]byte("tulle-vxlan/" + node))
	mac := net.HardwareAddr(h[:6])
	mac[0] = mac[0]&^0x01 | 0x02
	return mac
}

// Config is the device and what surrounds it.
type Config struct {
	Name     string
	VNI      int
	Port     int
	Underlay string     // underlay interface
	VTEP     netip.Addr // this node's underlay address: the tunnels' source
	MAC      net.HardwareAddr
	MTU      int
	// Local are this node's subnets: their first addresses go on the
	// device (the gateway addresses peers' neighbour entries name).
	Local []netip.Prefix
	// Networks are the cluster networks: only routes into them are
	// tulle's to prune.
	Networks []netip.Prefix
}

// Peer is one peer served over VXLAN.
type Peer struct {
	Subnets []netip.Prefix
	VTEP    netip.Addr // the peer's underlay address
	MAC     net.HardwareAddr
}

// Kernel programs the device for the current peers.
type Kernel struct {
	mu    sync.Mutex
	cfg   Config
	peers []Peer
	known bool // SetPeers was called: stale entries may go
}

// New returns a Kernel; Reconcile creates the device.
func New(cfg Config) *Kernel {
	if cfg.Name == "" {
		cfg.Name = DeviceName
	}
	return &Kernel{cfg: cfg}
}

// SetPeers replaces the peers; the next Reconcile applies them.
func (k *Kernel) SetPeers(peers []Peer) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.peers, k.known = slices.Clone(peers), true
}

// SetMTU follows an underlay MTU change (the device MTU, already reduced
// by Overhead).
func (k *Kernel) SetMTU(mtu int) {
	k.mu.Lock()
	k.cfg.MTU = mtu
	k.mu.Unlock()
}

func (k *Kernel) wantLink(underlay int) *netlink.Vxlan {
	c := k.cfg
	return &netlink.Vxlan{
		LinkAttrs: netlink.LinkAttrs{Name: c.Name, MTU: c.MTU, HardwareAddr: c.MAC},
		VxlanId:   c.VNI, VtepDevIndex: underlay, SrcAddr: c.VTEP.AsSlice(), Port: c.Port,
		Learning: false,
	}
}

// sameDevice reports whether an existing link is the device as configured
// (what cannot be changed in place).
func sameDevice(l netlink.Link, want *netlink.Vxlan) bool {
	v, ok := l.(*netlink.Vxlan)
	return ok && v.VxlanId == want.VxlanId && v.Port == want.Port && v.VtepDevIndex == want.VtepDevIndex &&
		v.SrcAddr.Equal(want.SrcAddr) && !v.Learning
}

// Reconcile brings the device and its entries to the configured state and
// reports what it changed.
func (k *Kernel) Reconcile() (changed []string, err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	ul, err := netlink.LinkByName(k.cfg.Underlay)
	if err != nil {
		return nil, fmt.Errorf("underlay %s: %w", k.cfg.Underlay, err)
	}
	want := k.wantLink(ul.Attrs().Index)
	l, err := netlink.LinkByName(k.cfg.Name)
	if err == nil && !sameDevice(l, want) {
		if err := netlink.LinkDel(l); err != nil {
			return changed, fmt.Errorf("replace %s: %w", k.cfg.Name, err)
		}
		changed = append(changed, "removed a mismatched "+k.cfg.Name)
		err = netlink.LinkNotFoundError{}
	}
	if err != nil {
		if !errors.As(err, new(netlink.LinkNotFoundError)) {
			return changed, fmt.Errorf("link %s: %w", k.cfg.Name, err)
		}
		if err := netlink.LinkAdd(want); err != nil {
			return changed, fmt.Errorf("create VXLAN device %s (VNI %d, port %d): %w", k.cfg.Name, k.cfg.VNI, k.cfg.Port, err)
		}
		changed = append(changed, fmt.Sprintf("created %s (VNI %d, port %d)", k.cfg.Name, k.cfg.VNI, k.cfg.Port))
		if l, err = netlink.LinkByName(k.cfg.Name); err != nil {
			return changed, fmt.Errorf("link %s: %w", k.cfg.Name, err)
		}
		// No IPv6 link-local address: nothing on the device speaks ND.
		netlink.LinkSetIP6AddrGenMode(l, 1)
	}
	a := l.Attrs()
	if a.MTU != k.cfg.MTU {
		if err := netlink.LinkSetMTU(l, k.cfg.MTU); err != nil {
			return changed, fmt.Errorf("%s mtu %d: %w", k.cfg.Name, k.cfg.MTU, err)
		}
		changed = append(changed, fmt.Sprintf("%s mtu %d", k.cfg.Name, k.cfg.MTU))
	}
	if a.HardwareAddr.String() != k.cfg.MAC.String() {
		if err := netlink.LinkSetHardwareAddr(l, k.cfg.MAC); err != nil {
			return changed, fmt.Errorf("%s mac: %w", k.cfg.Name, err)
		}
	}
	if a.Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(l); err != nil {
			return changed, fmt.Errorf("%s up: %w", k.cfg.Name, err)
		}
		changed = append(changed, k.cfg.Name+" up")
	}
	for _, p := range k.cfg.Local {
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Addr().BitLen(), p.Addr().BitLen())}}
		if p.Addr().Is6() {
			addr.Flags = unix.IFA_F_NODAD
		}
		have, err := netlink.AddrList(l, family(p.Addr()))
		if err != nil {
			return changed, err
		}
		if !slices.ContainsFunc(have, func(x netlink.Addr) bool { return x.IPNet.String() == addr.IPNet.String() }) {
			if err := netlink.AddrReplace(l, addr); err != nil {
				return changed, fmt.Errorf("%s address %s: %w", k.cfg.Name, addr.IPNet, err)
			}
			changed = append(changed, "address "+addr.IPNet.String())
		}
	}
	c, err := k.reconcilePeers(a.Index)
	return append(changed, c...), err
}

func family(a netip.Addr) int {
	if a.Is4() {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

// entries is what the device carries for the peers.
type entries struct {
	fdb    map[string]string // VTEP address → MAC
	neigh  map[netip.Addr]string
	routes map[netip.Prefix]netip.Addr // subnet → gateway
}

func (k *Kernel) wanted() entries {
	e := entries{fdb: map[string]string{}, neigh: map[netip.Addr]string{}, routes: map[netip.Prefix]netip.Addr{}}
	for _, p := range k.peers {
		e.fdb[p.VTEP.String()] = p.MAC.String()
		for _, s := range p.Subnets {
			gw := Gateway(s, p.MAC)
			e.neigh[gw] = p.MAC.String()
			e.routes[s.Masked()] = gw
		}
	}
	return e
}

// Gateway is the next hop of a peer's subnet on the device: the subnet's
// first address for IPv4, the link-local EUI-64 address of the peer's VTEP
// MAC for IPv6.
func Gateway(subnet netip.Prefix, mac net.HardwareAddr) netip.Addr {
	if subnet.Addr().Is4() {
		return subnet.Masked().Addr()
	}
	var a [16]byte
	a[0], a[1] = 0xfe, 0x80
	if len(mac) == 6 {
		a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15] = mac[0]^0x02, mac[1], mac[2], 0xff, 0xfe, mac[3], mac[4], mac[5]
	}
	return netip.AddrFrom16(a)
}

func (k *Kernel) route(index int, dst netip.Prefix, gw netip.Addr) *netlink.Route {
	rt := &netlink.Route{LinkIndex: index, Dst: &net.IPNet{IP: dst.Addr().AsSlice(), Mask: net.CIDRMask(dst.Bits(), dst.Addr().BitLen())},
		Gw: gw.AsSlice(), Flags: int(netlink.FLAG_ONLINK), Protocol: tunnel.RouteProtocol, Scope: netlink.SCOPE_UNIVERSE, Table: unix.RT_TABLE_MAIN}
	for _, p := range k.cfg.Local {
		if p.Addr().Is4() == dst.Addr().Is4() {
			rt.Src = p.Addr().AsSlice()
		}
	}
	return rt
}

func (k *Kernel) reconcilePeers(index int) (changed []string, err error) {
	want := k.wanted()
	// FDB: peer VTEP MAC → peer underlay address.
	fdb, err := netlink.NeighList(index, unix.AF_BRIDGE)
	if err != nil {
		return changed, fmt.Errorf("list FDB of %s: %w", k.cfg.Name, err)
	}
	have := map[string]string{}
	for _, n := range fdb {
		if n.IP != nil {
			have[n.IP.String()+"|"+n.HardwareAddr.String()] = ""
		}
	}
	for vtep, mac := range want.fdb {
		if _, ok := have[vtep+"|"+mac]; ok {
			continue
		}
		hw, _ := net.ParseMAC(mac)
		if err := netlink.NeighSet(&netlink.Neigh{LinkIndex: index, Family: unix.AF_BRIDGE, State: netlink.NUD_PERMANENT, Flags: netlink.NTF_SELF,
			IP: netip.MustParseAddr(vtep).AsSlice(), HardwareAddr: hw}); err != nil {
			return changed, fmt.Errorf("fdb %s → %s: %w", mac, vtep, err)
		}
		changed = append(changed, "fdb "+mac+" → "+vtep)
	}
	// Neighbours: peer gateway → peer VTEP MAC.
	cur := map[netip.Addr]netlink.Neigh{}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		ns, err := netlink.NeighList(index, fam)
		if err != nil {
			return changed, fmt.Errorf("list neighbours of %s: %w", k.cfg.Name, err)
		}
		for _, n := range ns {
			if a, ok := netip.AddrFromSlice(n.IP); ok {
				cur[a.Unmap()] = n
			}
		}
	}
	for gw, mac := range want.neigh {
		if n, ok := cur[gw]; ok && n.State&netlink.NUD_PERMANENT != 0 && n.HardwareAddr.String() == mac {
			continue
		}
		hw, _ := net.ParseMAC(mac)
		if err := netlink.NeighSet(&netlink.Neigh{LinkIndex: index, Family: family(gw), State: netlink.NUD_PERMANENT, Type: unix.RTN_UNICAST,
			IP: gw.AsSlice(), HardwareAddr: hw}); err != nil {
			return changed, fmt.Errorf("neighbour %s → %s: %w", gw, mac, err)
		}
		changed = append(changed, "neighbour "+gw.String()+" → "+mac)
	}
	// Routes: peer subnet via peer gateway, onlink.
	routes := map[netip.Prefix]netlink.Route{}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rs, err := netlink.RouteListFiltered(fam, &netlink.Route{LinkIndex: index, Protocol: tunnel.RouteProtocol, Table: unix.RT_TABLE_MAIN},
			netlink.RT_FILTER_OIF|netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
		if err != nil {
			return changed, fmt.Errorf("list routes of %s: %w", k.cfg.Name, err)
		}
		for _, r := range rs {
			if p, ok := prefixOf(r.Dst); ok {
				routes[p] = r
			}
		}
	}
	for dst, gw := range want.routes {
		if r, ok := routes[dst]; ok && r.Gw.Equal(gw.AsSlice()) {
			continue
		}
		if err := netlink.RouteReplace(k.route(index, dst, gw)); err != nil {
			return changed, fmt.Errorf("route %s via %s dev %s: %w", dst, gw, k.cfg.Name, err)
		}
		changed = append(changed, "route "+dst.String()+" via "+gw.String())
	}
	if !k.known {
		return changed, nil
	}
	// What departed peers left behind.
	for dst, r := range routes {
		if _, ok := want.routes[dst]; !ok && slices.ContainsFunc(k.cfg.Networks, func(n netip.Prefix) bool { return n.Contains(dst.Addr()) }) {
			if err := netlink.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
				return changed, fmt.Errorf("delete route %s: %w", dst, err)
			}
			changed = append(changed, "removed route "+dst.String())
		}
	}
	for a, n := range cur {
		if _, ok := want.neigh[a]; !ok && n.State&netlink.NUD_PERMANENT != 0 {
			if err := netlink.NeighDel(&n); err != nil && !errors.Is(err, unix.ENOENT) {
				return changed, fmt.Errorf("delete neighbour %s: %w", a, err)
			}
			changed = append(changed, "removed neighbour "+a.String())
		}
	}
	for _, n := range fdb {
		if n.IP == nil || n.State&netlink.NUD_PERMANENT == 0 {
			continue
		}
		if mac, ok := want.fdb[n.IP.String()]; ok && mac == n.HardwareAddr.String() {
			continue
		}
		if err := netlink.NeighDel(&n); err != nil && !errors.Is(err, unix.ENOENT) {
			return changed, fmt.Errorf("delete fdb %s → %s: %w", n.HardwareAddr, n.IP, err)
		}
		changed = append(changed, "removed fdb "+n.HardwareAddr.String()+" → "+n.IP.String())
	}
	return changed, nil
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}

// Check reports, without changing anything, why the device cannot carry
// the peers' traffic now: missing, down, of the wrong MTU, or an entry
// missing.
func (k *Kernel) Check() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	l, err := netlink.LinkByName(k.cfg.Name)
	if err != nil {
		return fmt.Errorf("VXLAN device %s: %w", k.cfg.Name, err)
	}
	switch a := l.Attrs(); {
	case a.Flags&net.FlagUp == 0:
		return fmt.Errorf("VXLAN device %s is down", k.cfg.Name)
	case a.MTU != k.cfg.MTU:
		return fmt.Errorf("VXLAN device %s has MTU %d, want %d", k.cfg.Name, a.MTU, k.cfg.MTU)
	}
	want := k.wanted()
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		ns, err := netlink.NeighList(l.Attrs().Index, fam)
		if err != nil {
			return err
		}
		for _, n := range ns {
			if a, ok := netip.AddrFromSlice(n.IP); ok {
				delete(want.neigh, a.Unmap())
			}
		}
	}
	for gw := range want.neigh {
		return fmt.Errorf("VXLAN neighbour entry for %s missing", gw)
	}
	return nil
}

// Cleanup removes the device, and with it every FDB entry, neighbour and
// route tulle put on it. A device already gone counts as removed.
func Cleanup(name string) error {
	l, err := netlink.LinkByName(name)
	if errors.As(err, new(netlink.LinkNotFoundError)) {
		return nil
	}
	if err != nil {
		return err
	}
	if _, ok := l.(*netlink.Vxlan); !ok {
		return fmt.Errorf("%s is a %s, not tulle's VXLAN device: left alone", name, l.Type())
	}
	if err := netlink.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}

// RemoveFormer removes tulle's device when it carries VXLAN on port: the
// kernel path of an earlier run of this node, before its VXLAN moved to
// userspace. It would hold the port and keep serving peers with entries
// nobody reconciles. A device on another port (another tulled on this
// host) is left alone. It reports whether a device was removed.
func RemoveFormer(name string, port int) (bool, error) {
	l, err := netlink.LinkByName(name)
	if errors.As(err, new(netlink.LinkNotFoundError)) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if v, ok := l.(*netlink.Vxlan); !ok || v.Port != port {
		return false, nil
	}
	return true, Cleanup(name)
}
