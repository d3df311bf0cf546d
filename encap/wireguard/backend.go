package wireguard

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/tulle-net/tulle/encap"
	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/tunnel"
)

// Name is the backend's name in net-conf, capabilities and status.
const Name = netconf.BackendWireGuard

// Caps is what a peer needs for WireGuard: the node's port and public key
// (base64, as wg(8) shows it). A node configured for WireGuard publishes
// nothing else, so no peer ever reaches it in plaintext.
type Caps struct {
	Port      uint16 `json:"port"`
	PublicKey string `json:"publicKey"`
}

// Backend is the WireGuard row of a table: forced only (net-conf's
// Backend.Type wireguard), and then the only backend the node speaks.
type Backend struct {
	key, psk, device string
	rekey            time.Duration
}

var _ encap.Backend = (*Backend)(nil)

// NewBackend returns the WireGuard row of a table.
func NewBackend() *Backend { return &Backend{} }

func (*Backend) Name() string      { return Name }
func (*Backend) Best() encap.Class { return encap.Forced }

// AddFlags implements encap.Backend: --wireguard-*.
func (b *Backend) AddFlags(fs *flag.FlagSet) {
	fs.StringVar(&b.key, "wireguard-key", "/var/lib/tulle/wireguard.key", "WireGuard private key file (Backend.Type wireguard; created, mode 0600, when missing)")
	fs.StringVar(&b.device, "wireguard-device", DeviceName, "WireGuard device for Backend.Mode kernel/auto (created where the kernel has WireGuard; an existing device of this name, of any implementation, is configured as it is)")
	fs.DurationVar(&b.rekey, "wireguard-rekey-after", DefaultTimers.RekeyAfterTime, "renew WireGuard sessions this node initiated after this long (the protocol's 2m; shorter to exercise rekeying)")
	fs.StringVar(&b.psk, "wireguard-psk", "", "WireGuard pre-shared key file (base64, as wg genpsk writes it), mixed into every handshake; all nodes alike")
}

// Check implements encap.Backend.
func (b *Backend) Check(c *netconf.Config) error {
	if len(b.device) == 0 || len(b.device) > 15 || strings.ContainsAny(b.device, "/ \x00") {
		return netconf.Errorf("flag --wireguard-device: %q is not a valid interface name", b.device)
	}
	if b.rekey < time.Second || b.rekey > DefaultTimers.RekeyAfterTime {
		return netconf.Errorf("flag --wireguard-rekey-after: %s out of range 1s-%s", b.rekey, DefaultTimers.RekeyAfterTime)
	}
	if c == nil || c.Backend.Type != Name {
		return nil
	}
	if _, err := ReadKeyFile(b.key); err != nil && !errors.Is(err, os.ErrNotExist) {
		return netconf.Errorf("flag --wireguard-key: %v", err)
	}
	if b.psk != "" {
		if _, err := ReadPSKFile(b.psk); err != nil {
			return netconf.Errorf("flag --wireguard-psk: %v", err)
		}
	}
	return nil
}

// Cleanup implements encap.Backend: the WireGuard device tulled made.
func (b *Backend) Cleanup() error { return CleanupDevice(b.device) }

// Parse implements encap.Backend.
func (*Backend) Parse(raw json.RawMessage) (encap.Capability, error) {
	var w Caps
	if err := json.Unmarshal(raw, &w); err != nil {
		return nil, err
	}
	k, err := ParseKey(w.PublicKey)
	switch {
	case err != nil:
		return nil, fmt.Errorf("public key %q: %v", w.PublicKey, err)
	case k.IsZero():
		return nil, errors.New("public key is all zeros")
	case w.Port == 0:
		return nil, errors.New("no port")
	}
	return w, nil
}

// Reach implements encap.Capability: the peer's key at its endpoint.
func (Caps) Reach(t encap.Capability, pair encap.Pair) (encap.Path, string) {
	theirs := t.(Caps)
	ep := pair.Endpoint(theirs.Port)
	if !ep.IsValid() {
		return encap.Path{}, "no underlay address in a family this node has"
	}
	k, _ := ParseKey(theirs.PublicKey)
	return encap.Path{Class: encap.Forced, Endpoint: ep, Peer: k}, ""
}

// Peers are the WireGuard peers of as.
func Peers(as []encap.Assignment) []PeerConfig {
	out := make([]PeerConfig, 0, len(as))
	for _, a := range as {
		k, _ := a.Path.Peer.(Key)
		out = append(out, PeerConfig{Name: a.Peer.Node, Key: k, Endpoint: a.Endpoint, Subnets: a.Subnets})
	}
	return out
}

// Start implements encap.Backend: it loads (or creates) the node's key
// and starts WireGuard in the mode net-conf asks for: a WireGuard device
// (the kernel's, or an existing one of --wireguard-device's name) where
// Mode allows and there is one, else tulled's own. Everything wrong with
// the configuration is a config error before anything is created.
func (b *Backend) Start(env encap.Env) (encap.Running, error) {
	n, log, u := env.Net, env.Logger, env.Underlay
	if n.Backend.Type != Name {
		return nil, nil
	}
	device := false
	if n.Backend.Mode != netconf.WireGuardUserspace {
		var why error
		if !Exists(b.device) {
			why = ProbeKernel()
		}
		switch {
		case why != nil && n.Backend.Mode == netconf.WireGuardKernel:
			return nil, netconf.Errorf("net-conf field Backend.Mode: kernel, but this kernel has no WireGuard (%v) and there is no WireGuard device %s", why, b.device)
		case why != nil:
			log.Info("WireGuard in userspace: the kernel has none", "why", why)
		default:
			device = true
		}
	}
	key, created, err := LoadOrCreateKey(b.key)
	if err != nil {
		return nil, netconf.Errorf("flag --wireguard-key: %v", err)
	}
	if created {
		log.Info("created a WireGuard key", "file", b.key, "public_key", key.Public())
	}
	var psk Key
	if b.psk != "" {
		if psk, err = ReadPSKFile(b.psk); err != nil {
			return nil, netconf.Errorf("flag --wireguard-psk: %v", err)
		}
	}
	r := &running{port: n.Backend.Port, v6: u.Primary6(), keyFile: b.key}
	if device {
		r.dev, err = NewDevice(DeviceConfig{Name: b.device, PrivateKey: key, PresharedKey: psk, Port: n.Backend.Port,
			MTU: InnerMTU(u.MTU, r.v6), PersistentKeepalive: n.Backend.PersistentKeepalive, Logger: log})
		if err != nil {
			return nil, err
		}
		log.Info("WireGuard through a device", "device", b.device)
		return r, nil
	}
	timers := DefaultTimers
	timers.RekeyAfterTime = b.rekey
	cfg := Config{PrivateKey: key, PresharedKey: psk, MTU: u.MTU, PersistentKeepalive: n.Backend.PersistentKeepalive, Timers: timers,
		DisableGSO: env.DisableGSO, DisableGRO: env.DisableGRO, Counters: &r.ctr, Logger: log}
	if u.IP4.IsValid() {
		cfg.Local4 = netip.AddrPortFrom(u.IP4, n.Backend.Port)
	}
	if u.IP6.IsValid() {
		cfg.Local6 = netip.AddrPortFrom(u.IP6, n.Backend.Port)
	}
	if r.transport, err = New(cfg); err != nil {
		return nil, fmt.Errorf("start WireGuard: %w", err)
	}
	return r, nil
}

// running is this node's WireGuard: tulled's own (transport) or a device
// it programs (dev), never both.
type running struct {
	port      uint16
	v6        bool
	keyFile   string
	transport *Transport
	dev       *Device
	ctr       Counters
	rotMu     sync.Mutex
}

var (
	_ encap.Reporter = (*running)(nil)
	_ encap.Rotator  = (*running)(nil)
)

func (r *running) publicKey() Key {
	if r.dev != nil {
		return r.dev.PublicKey()
	}
	return r.transport.PublicKey()
}

func (r *running) Capability() encap.Capability {
	return Caps{Port: r.port, PublicKey: r.publicKey().String()}
}

// Transport implements encap.Running: nil with a device, which carries
// every peer itself.
func (r *running) Transport() encap.Transport {
	if r.dev != nil {
		return nil
	}
	return r.transport
}

func (r *running) Kernel() tunnel.KernelPath {
	if r.dev == nil {
		return nil
	}
	return r.dev
}

// Sizes implements encap.Running: super-packets are cut into messages
// whatever their size.
func (r *running) Sizes(underlayMTU int) (int, int) {
	return InnerMTU(underlayMTU, r.v6), tunnel.MaxPacket
}

func (r *running) Attach(subnets []netip.Prefix) error {
	if r.dev != nil {
		r.dev.SetLocal(subnets)
	}
	return nil
}

func (r *running) SetPeers(as []encap.Assignment) {
	if r.dev != nil {
		r.dev.SetPeers(Peers(as))
		return
	}
	r.transport.SetPeers(Peers(as))
}

func (r *running) SetMTU(underlayMTU int) {
	if r.dev != nil {
		r.dev.SetMTU(InnerMTU(underlayMTU, r.v6))
		return
	}
	r.transport.SetMTU(underlayMTU)
}

func (r *running) Counters() encap.Counters {
	m := map[string]uint64{}
	r.ctr.SnapshotInto(m)
	return encap.Counters{Component: Name, Prefix: "wg_", Values: m}
}

// Close releases what runs (the kernel device stays, with its sessions).
func (r *running) Close() error {
	if r.dev != nil {
		return r.dev.Close()
	}
	return r.transport.Close()
}

// Report implements encap.Reporter: this node's WireGuard identity and
// each peer's session state. The datapath counts a userspace peer's
// traffic; a device counts its own.
func (r *running) Report(doc *api.Status) {
	pub := r.publicKey()
	mode := "userspace"
	if r.dev != nil {
		mode = "kernel"
	}
	doc.WireGuard = &api.WireGuardNode{PublicKey: pub.String(), Fingerprint: pub.Fingerprint(), Port: r.port, Mode: mode}
	var st []PeerStatus
	if r.dev != nil {
		st = r.dev.Status()
	} else {
		st = r.transport.Status()
	}
	byName := map[string]PeerStatus{}
	for _, p := range st {
		byName[p.Name] = p
	}
	peers := slices.Clone(doc.Peers)
	for i := range peers {
		p, ok := byName[peers[i].Name]
		if !ok {
			continue
		}
		w := &api.WireGuardPeer{PublicKey: p.Key.String(), Fingerprint: p.Key.Fingerprint(), Endpoint: p.Endpoint,
			LastHandshake: p.LastHandshake, RxBytes: p.RxBytes, TxBytes: p.TxBytes, Refused: p.Refused}
		if r.dev == nil && peers[i].Traffic != nil {
			w.RxBytes, w.TxBytes = peers[i].Traffic.RxBytes, peers[i].Traffic.TxBytes
		}
		peers[i].WireGuard = w
	}
	doc.Peers = peers
}

// RotateKey implements encap.Rotator: a new key, written to the key file
// (atomically, 0600) and given to whichever runs. OldKeyGrace is how long
// the old key still answers handshakes: the userspace transport's grace,
// cut to nothing with now; a kernel device answers only its current key.
func (r *running) RotateKey(now bool) (api.RotatedKey, error) {
	r.rotMu.Lock()
	defer r.rotMu.Unlock()
	k, err := NewPrivateKey()
	if err != nil {
		return api.RotatedKey{}, err
	}
	if err := WriteKeyFile(r.keyFile, k); err != nil {
		return api.RotatedKey{}, err
	}
	var grace time.Duration
	switch {
	case r.dev != nil:
		r.dev.SetPrivateKey(k)
	case now:
		r.transport.SetPrivateKey(k)
		r.transport.EndKeyGrace()
	default:
		r.transport.SetPrivateKey(k)
		grace = KeyGrace
	}
	return api.RotatedKey{PublicKey: k.Public().String(), Fingerprint: k.Public().Fingerprint(), OldKeyGrace: grace}, nil
}
