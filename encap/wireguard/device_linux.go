package wireguard

import (
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
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/tulle-net/tulle/tunnel"
)

// DeviceName is the kernel WireGuard device tulled creates.
const DeviceName = "tulle-wg0"

// DeviceConfig configures the kernel path.
type DeviceConfig struct {
	Name                string // DeviceName if empty
	PrivateKey          Key
	PresharedKey        Key
	Port                uint16
	MTU                 int
	PersistentKeepalive time.Duration
	// Local are this node's subnets: routes to peers take their first
	// addresses as source.
	Local  []netip.Prefix
	Logger *slog.Logger // slog.Default() if nil
}

// Device programs a WireGuard device through wgctrl (the kernel's over
// generic netlink; any implementation's over its UAPI socket, such as
// wireguard-go's, when a device of that name already exists): key, port,
// peers with their subnets as allowed IPs, and a route per peer subnet.
// It never replaces the peer list wholesale, so a reconcile (or a
// restarted tulled) keeps the device's sessions. It implements
// tunnel.KernelPath.
type Device struct {
	mu      sync.Mutex
	cfg     DeviceConfig
	peers   []PeerConfig
	refused []PeerStatus // peers vet refused (see Transport.SetPeers)
	known   bool         // SetPeers was called: stale peers and routes may go
	client  *wgctrl.Client
}

// NewDevice opens the wgctrl client; Reconcile creates the device.
func NewDevice(cfg DeviceConfig) (*Device, error) {
	if cfg.Name == "" {
		cfg.Name = DeviceName
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	c, err := wgctrl.New()
	if err != nil {
		return nil, fmt.Errorf("wireguard control: %w", err)
	}
	return &Device{cfg: cfg, client: c}, nil
}

// Close releases the wgctrl client; the device stays.
func (d *Device) Close() error { return d.client.Close() }

// Name is the device's name.
func (d *Device) Name() string { return d.cfg.Name }

// PublicKey returns the device's public key (this node's).
func (d *Device) PublicKey() Key {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cfg.PrivateKey.Public()
}

// SetPeers replaces the peers; the next Reconcile applies them. Peers
// that share an endpoint or a key, or carry this node's key, are refused
// as the userspace transport refuses them (Status shows them).
func (d *Device) SetPeers(peers []PeerConfig) {
	d.mu.Lock()
	defer d.mu.Unlock()
	ok, refused := vet(peers, []Key{d.cfg.PrivateKey.Public()})
	logRefusals(d.cfg.Logger, d.refused, refused)
	d.peers, d.refused, d.known = ok, refused, true
}

// SetPrivateKey rotates the device's key on the next Reconcile.
func (d *Device) SetPrivateKey(k Key) {
	d.mu.Lock()
	d.cfg.PrivateKey = k
	d.mu.Unlock()
}

// SetLocal sets this node's subnets (the lease), whose first addresses
// are the source of routes to peers.
func (d *Device) SetLocal(local []netip.Prefix) {
	d.mu.Lock()
	d.cfg.Local = slices.Clone(local)
	d.mu.Unlock()
}

// SetMTU follows an underlay MTU change.
func (d *Device) SetMTU(mtu int) {
	d.mu.Lock()
	d.cfg.MTU = mtu
	d.mu.Unlock()
}

// Exists reports whether a WireGuard device of that name is already there
// (the kernel's, or another implementation's with a UAPI socket): tulled
// then configures it as it is.
func Exists(name string) bool {
	c, err := wgctrl.New()
	if err != nil {
		return false
	}
	defer c.Close()
	_, err = c.Device(name)
	return err == nil
}

// Reconcile brings the device, its peers and routes to the configured
// state and reports what it changed.
func (d *Device) Reconcile() (changed []string, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	c := d.cfg
	l, err := netlink.LinkByName(c.Name)
	if errors.As(err, new(netlink.LinkNotFoundError)) {
		if err := netlink.LinkAdd(&netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: c.Name, MTU: c.MTU}}); err != nil {
			return nil, fmt.Errorf("create WireGuard device %s: %w", c.Name, err)
		}
		changed = append(changed, "created "+c.Name)
		l, err = netlink.LinkByName(c.Name)
	}
	if err != nil {
		return changed, fmt.Errorf("link %s: %w", c.Name, err)
	}
	a := l.Attrs()
	if a.MTU != c.MTU {
		if err := netlink.LinkSetMTU(l, c.MTU); err != nil {
			return changed, fmt.Errorf("%s mtu %d: %w", c.Name, c.MTU, err)
		}
		changed = append(changed, fmt.Sprintf("%s mtu %d", c.Name, c.MTU))
	}
	if a.Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(l); err != nil {
			return changed, fmt.Errorf("%s up: %w", c.Name, err)
		}
		changed = append(changed, c.Name+" up")
	}
	dev, err := d.client.Device(c.Name)
	if err != nil {
		return changed, fmt.Errorf("read WireGuard device %s: %w", c.Name, err)
	}
	cfg, what := d.diff(dev)
	if len(what) > 0 {
		if err := d.client.ConfigureDevice(c.Name, cfg); err != nil {
			return changed, fmt.Errorf("configure WireGuard device %s: %w", c.Name, err)
		}
		changed = append(changed, what...)
	}
	r, err := d.reconcileRoutes(a.Index)
	return append(changed, r...), err
}

// diff returns the configuration that takes dev to the wanted state, and
// what it changes.
func (d *Device) diff(dev *wgtypes.Device) (wgtypes.Config, []string) {
	c := d.cfg
	var cfg wgtypes.Config
	var what []string
	if Key(dev.PrivateKey) != c.PrivateKey {
		k := wgtypes.Key(c.PrivateKey)
		cfg.PrivateKey = &k
		what = append(what, "private key")
	}
	if dev.ListenPort != int(c.Port) {
		p := int(c.Port)
		cfg.ListenPort = &p
		what = append(what, fmt.Sprintf("listen port %d", p))
	}
	have := map[Key]wgtypes.Peer{}
	for _, p := range dev.Peers {
		have[Key(p.PublicKey)] = p
	}
	ka := c.PersistentKeepalive
	for _, p := range d.peers {
		h, ok := have[p.Key]
		delete(have, p.Key)
		allowed := make([]net.IPNet, 0, len(p.Subnets))
		for _, s := range p.Subnets {
			allowed = append(allowed, net.IPNet{IP: s.Addr().AsSlice(), Mask: net.CIDRMask(s.Bits(), s.Addr().BitLen())})
		}
		if ok && sameEndpoint(h.Endpoint, p.Endpoint) && sameNets(h.AllowedIPs, allowed) && Key(h.PresharedKey) == c.PresharedKey && h.PersistentKeepaliveInterval == ka {
			continue
		}
		psk := wgtypes.Key(c.PresharedKey)
		cfg.Peers = append(cfg.Peers, wgtypes.PeerConfig{PublicKey: wgtypes.Key(p.Key), Endpoint: net.UDPAddrFromAddrPort(p.Endpoint),
			ReplaceAllowedIPs: true, AllowedIPs: allowed, PresharedKey: &psk, PersistentKeepaliveInterval: &ka})
		what = append(what, "peer "+p.Name)
	}
	if d.known {
		for k := range have {
			cfg.Peers = append(cfg.Peers, wgtypes.PeerConfig{PublicKey: wgtypes.Key(k), Remove: true})
			what = append(what, "removed peer "+k.Fingerprint())
		}
	}
	return cfg, what
}

func sameEndpoint(have *net.UDPAddr, want netip.AddrPort) bool {
	if have == nil {
		return false
	}
	ap := have.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()) == want
}

func sameNets(have, want []net.IPNet) bool {
	key := func(ns []net.IPNet) []string {
		var s []string
		for _, n := range ns {
			s = append(s, n.String())
		}
		slices.Sort(s)
		return s
	}
	return slices.Equal(key(have), key(want))
}

// route is tulle's route to a peer subnet through the device.
func (d *Device) route(index int, dst netip.Prefix) *netlink.Route {
	rt := &netlink.Route{LinkIndex: index, Dst: &net.IPNet{IP: dst.Addr().AsSlice(), Mask: net.CIDRMask(dst.Bits(), dst.Addr().BitLen())},
		Protocol: tunnel.RouteProtocol, Scope: netlink.SCOPE_LINK, Table: unix.RT_TABLE_MAIN}
	for _, p := range d.cfg.Local {
		if p.Addr().Is4() == dst.Addr().Is4() {
			rt.Src = p.Addr().AsSlice()
		}
	}
	return rt
}

func (d *Device) reconcileRoutes(index int) (changed []string, err error) {
	want := map[netip.Prefix]bool{}
	for _, p := range d.peers {
		for _, s := range p.Subnets {
			want[s.Masked()] = true
		}
	}
	have := map[netip.Prefix]bool{}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rs, err := netlink.RouteListFiltered(fam, &netlink.Route{LinkIndex: index, Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_OIF|netlink.RT_FILTER_TABLE)
		if err != nil {
			return changed, fmt.Errorf("routes on %s: %w", d.cfg.Name, err)
		}
		for _, r := range rs {
			if r.Protocol != tunnel.RouteProtocol || r.Dst == nil {
				continue
			}
			ones, _ := r.Dst.Mask.Size()
			a, _ := netip.AddrFromSlice(r.Dst.IP)
			p := netip.PrefixFrom(a.Unmap(), ones)
			have[p] = true
			if !want[p] && d.known {
				if err := netlink.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
					return changed, fmt.Errorf("remove route %s: %w", p, err)
				}
				changed = append(changed, "removed route "+p.String())
			}
		}
	}
	for p := range want {
		if have[p] {
			continue
		}
		if err := netlink.RouteReplace(d.route(index, p)); err != nil {
			return changed, fmt.Errorf("route %s dev %s: %w", p, d.cfg.Name, err)
		}
		changed = append(changed, "route "+p.String()+" dev "+d.cfg.Name)
	}
	return changed, nil
}

// Check reports, without changing anything, why the device cannot carry
// the peers' traffic now.
func (d *Device) Check() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	l, err := netlink.LinkByName(d.cfg.Name)
	if err != nil {
		return fmt.Errorf("WireGuard device %s: %w", d.cfg.Name, err)
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		return fmt.Errorf("WireGuard device %s is down", d.cfg.Name)
	}
	dev, err := d.client.Device(d.cfg.Name)
	if err != nil {
		return fmt.Errorf("WireGuard device %s: %w", d.cfg.Name, err)
	}
	if _, what := d.diff(dev); len(what) > 0 {
		return fmt.Errorf("WireGuard device %s is not configured yet (%s)", d.cfg.Name, what[0])
	}
	return nil
}

// Status returns every peer's state as the device reports it.
func (d *Device) Status() []PeerStatus {
	d.mu.Lock()
	names := map[Key]string{}
	for _, p := range d.peers {
		names[p.Key] = p.Name
	}
	out := slices.Clone(d.refused)
	d.mu.Unlock()
	dev, err := d.client.Device(d.cfg.Name)
	if err != nil {
		return out
	}
	for _, p := range dev.Peers {
		st := PeerStatus{Name: names[Key(p.PublicKey)], Key: Key(p.PublicKey), LastHandshake: p.LastHandshakeTime, RxBytes: uint64(p.ReceiveBytes), TxBytes: uint64(p.TransmitBytes)}
		if p.Endpoint != nil {
			ap := p.Endpoint.AddrPort()
			st.Endpoint = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		}
		if st.LastHandshake.Unix() <= 0 {
			st.LastHandshake = time.Time{}
		}
		out = append(out, st)
	}
	return out
}

// CleanupDevice removes tulle's kernel WireGuard device. A device already
// gone counts as removed; a device of that name that is not the kernel's
// (another implementation's) is left alone.
func CleanupDevice(name string) error {
	l, err := netlink.LinkByName(name)
	if errors.As(err, new(netlink.LinkNotFoundError)) {
		return nil
	}
	if err != nil {
		return err
	}
	if _, ok := l.(*netlink.Wireguard); !ok {
		return nil
	}
	if err := netlink.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}
