// Package wireguard is tulle's WireGuard backend: the WireGuard protocol
// (Noise IKpsk2 handshakes, cookies under load, transport messages with a
// replay window, the paper's rekey and expiry timers) spoken from tulled's
// datapath as a tunnel.Transport, interoperable with every WireGuard
// implementation; and the kernel's WireGuard device programmed over
// netlink where the module exists (Device).
//
// The userspace path is built for TSO super-packets: a frame read from the
// TUN is cut along its segments straight into the send buffer, each
// segment sealed in place and the lot sent as one UDP GSO train; a UDP
// GRO message is opened whole in place and its segments merged back into
// one super-packet for the TUN. No goroutine hand-off and no allocation
// per packet: the tx loop that read a frame seals it, the rx loop that
// received a message opens it. Handshakes run on a goroutine of their own
// behind a bounded queue.
//
// It owns its sockets, keys and sessions; it never touches the TUN, routes
// or leases: cmd/tulled feeds it peers (public key and endpoint) chosen by
// encap.
package wireguard

import (
	"crypto/cipher"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tulle-net/tulle/encap/internal/udpsock"
	"github.com/tulle-net/tulle/internal/pool"
	"github.com/tulle-net/tulle/tunnel"
)

// Timers are the protocol's timing constants (the paper's §6.1). Tests
// shorten them; production uses DefaultTimers.
type Timers struct {
	RekeyAfterTime     time.Duration // an initiator renews a session this old
	RejectAfterTime    time.Duration // no session is used past this age
	RekeyAttemptTime   time.Duration // a handshake is retried this long
	RekeyTimeout       time.Duration // between retries of an initiation
	KeepaliveTimeout   time.Duration // a passive keepalive after this much one-way traffic
	RekeyAfterMessages uint64        // an initiator renews a session after this many messages
}

// DefaultTimers are the protocol's values.
var DefaultTimers = Timers{
	RekeyAfterTime:     120 * time.Second,
	RejectAfterTime:    180 * time.Second,
	RekeyAttemptTime:   90 * time.Second,
	RekeyTimeout:       5 * time.Second,
	KeepaliveTimeout:   10 * time.Second,
	RekeyAfterMessages: 1 << 60,
}

const (
	rejectAfterMessages = 1<<64 - 1<<13 - 1
	// initiationMinInterval bounds initiations consumed per peer (the
	// paper's flood protection: 50 per second).
	initiationMinInterval = 20 * time.Millisecond
	// maxStaged is how many frames one peer may hold while its session is
	// set up, maxStagedBytes what all peers' staged frames may hold.
	maxStaged      = 16
	maxStagedBytes = 8 << 20
	// handshakeQueue bounds handshake messages waiting for the handshake
	// goroutine; past an eighth of it the node is under load and asks
	// for cookies.
	handshakeQueue = 1024
	// tick is how often the timers are looked at.
	tick = 100 * time.Millisecond
	// eagerJitter spreads the handshakes offered to new peers.
	eagerJitter = 50 * time.Millisecond
)

// OverheadFor returns the bytes WireGuard adds to an inner packet on an
// underlay of the given family: IP and UDP headers, message header and
// tag. The inner MTU is the underlay MTU minus this (1440 over IPv4,
// 1420 over IPv6 at 1500; wg-quick's 1420 assumes IPv6).
func OverheadFor(v6 bool) int {
	if v6 {
		return 40 + 8 + Overhead
	}
	return 20 + 8 + Overhead
}

// InnerMTU is the largest inner packet for an underlay MTU.
func InnerMTU(underlayMTU int, v6 bool) int { return underlayMTU - OverheadFor(v6) }

// Config configures a Transport.
type Config struct {
	PrivateKey Key
	// PresharedKey, if not zero, is mixed into every handshake (all
	// peers alike): a second secret besides the keys.
	PresharedKey Key
	// Local addresses to bind, one per underlay family; port 0 picks one.
	Local4, Local6 netip.AddrPort
	// MTU is the underlay link MTU.
	MTU int
	// PersistentKeepalive, if set, sends a keepalive to every peer that
	// has heard nothing from this node for that long (NAT bindings).
	PersistentKeepalive time.Duration
	// Timers default to DefaultTimers.
	Timers                 Timers
	DisableGSO, DisableGRO bool
	Counters               *Counters
	Logger                 *slog.Logger
}

// PeerConfig is one peer as the lease store tells of it.
type PeerConfig struct {
	Name string
	Key  Key // its public key
	// Endpoint is where its handshakes and data go, and the Addr its
	// frames carry in the datapath (whatever address it roams to).
	Endpoint netip.AddrPort
	// Subnets are its allowed IPs, bound to its key: a packet its key
	// decrypts must come from one of them, and a packet is sealed for its
	// key only when it goes to one of them (the kernel device routes and
	// admits them alike).
	Subnets []netip.Prefix
}

// Transport speaks WireGuard to its peers. It implements
// tunnel.Transport and encap.Userspace.
type Transport struct {
	cfg    Config
	timers Timers
	ctr    *Counters
	log    *slog.Logger
	socks  udpsock.Sockets

	keys atomic.Pointer[keyMaterial]
	// underLoadUntil (mono): the node stays under load (cookies asked
	// for, sources rate-limited) for a second after its queue drains.
	underLoadUntil atomic.Int64
	// prevKeys is the identity before the last rotation: initiations
	// made with it (from peers that have not learned the new key yet)
	// are still answered until prevUntil (mono).
	prevKeys  atomic.Pointer[keyMaterial]
	prevUntil atomic.Int64

	mu    sync.Mutex                   // SetPeers, SetPrivateKey
	peers atomic.Pointer[peerSnapshot] // immutable, swapped whole
	index sync.Map                     // uint32 → *keypair or *peer (a handshake in flight)

	senders     *pool.Pool[sender]
	stagedBytes atomic.Int64 // memory held by staged frames, all peers
	hsq         chan hsMessage
	kicks       chan *peer
	cookies     cookieJar
	limiter     rateLimiter
	done        chan struct{}
	wg          sync.WaitGroup
	closed      atomic.Bool
}

type peerSnapshot struct {
	byKey      map[Key]*peer
	byEndpoint map[netip.AddrPort]*peer
	list       []*peer
	refused    []PeerStatus // peers SetPeers would not take, with why
}

var _ tunnel.Transport = (*Transport)(nil)

// epoch anchors the monotonic nanosecond clock the hot path stores in
// atomics.
var epoch = time.Now()

func mono() int64 { return int64(time.Since(epoch)) }

// New binds the sockets and starts the handshake goroutine.
func New(cfg Config) (*Transport, error) {
	if cfg.Counters == nil {
		cfg.Counters = &Counters{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Timers == (Timers{}) {
		cfg.Timers = DefaultTimers
	}
	if cfg.PrivateKey.IsZero() {
		return nil, errors.New("wireguard: no private key")
	}
	if !cfg.Local4.IsValid() && !cfg.Local6.IsValid() {
		return nil, errors.New("wireguard: no local address to bind")
	}
	if InnerMTU(cfg.MTU, !cfg.Local4.IsValid()) < 576 {
		return nil, fmt.Errorf("wireguard: underlay MTU %d too small", cfg.MTU)
	}
	t := &Transport{cfg: cfg, timers: cfg.Timers, ctr: cfg.Counters, log: cfg.Logger,
		hsq: make(chan hsMessage, handshakeQueue), kicks: make(chan *peer, 256), done: make(chan struct{})}
	t.keys.Store(newKeyMaterial(cfg.PrivateKey))
	t.peers.Store(&peerSnapshot{byKey: map[Key]*peer{}, byEndpoint: map[netip.AddrPort]*peer{}})
	for _, la := range []netip.AddrPort{cfg.Local4, cfg.Local6} {
		if !la.IsValid() {
			continue
		}
		s, err := udpsock.Listen(la, cfg.DisableGSO, cfg.DisableGRO)
		if err != nil {
			t.socks.Close()
			return nil, fmt.Errorf("wireguard: %w", err)
		}
		s.SetMTU(cfg.MTU)
		t.socks = append(t.socks, s)
		t.log.Info("wireguard listening", "addr", s.Name, "gso", s.GSO(), "gro", s.GRO, "public_key", t.keys.Load().pub)
	}
	t.senders = pool.New(runtime.GOMAXPROCS(0), func() *sender { return newSender(t) })
	t.wg.Go(t.handshakes)
	return t, nil
}

// PublicKey returns this node's public key.
func (t *Transport) PublicKey() Key { return t.keys.Load().pub }

// LocalAddrs returns the bound addresses (with the chosen ports).
func (t *Transport) LocalAddrs() []netip.AddrPort {
	var out []netip.AddrPort
	for _, s := range t.socks {
		out = append(out, s.LocalAddr())
	}
	return out
}

// KeyGrace is how long initiations to the previous key are answered
// after a rotation: time for the new public key to reach every peer.
const KeyGrace = 2 * time.Minute

// SetPrivateKey rotates this node's static key. Sessions keep carrying
// traffic; initiations from now on use the new key, and peers that still
// know only the old one are answered for KeyGrace, so a rotation breaks
// no session and delays no handshake.
func (t *Transport) SetPrivateKey(k Key) {
	t.mu.Lock()
	defer t.mu.Unlock()
	km := newKeyMaterial(k)
	t.prevKeys.Store(t.keys.Load())
	t.prevUntil.Store(mono() + int64(KeyGrace))
	t.keys.Store(km)
	for _, p := range t.peers.Load().list {
		p.setStatic(km)
	}
}

// EndKeyGrace stops answering initiations to the key before the last
// rotation now, rather than when its grace ends: after that key leaked,
// nobody may handshake with it. Peers that have not learned the new key
// yet wait until they do.
func (t *Transport) EndKeyGrace() {
	t.prevUntil.Store(0)
	t.prevKeys.Store(nil)
}

// previousKeys returns the identity before the last rotation while its
// grace lasts.
func (t *Transport) previousKeys() *keyMaterial {
	km := t.prevKeys.Load()
	if km == nil || mono() > t.prevUntil.Load() {
		return nil
	}
	return km
}

// SetPeers replaces the peer set. Peers keep their sessions across calls
// (by public key, or by name when a peer rotated its key); departed
// peers' sessions are wiped. Peers that claim one endpoint or one key, or
// carry this node's own key, are all refused (logged, shown in Status):
// two nodes cannot tell which of them owns such an endpoint or key, and
// one of them could take the other's traffic.
func (t *Transport) SetPeers(cfgs []PeerConfig) {
	t.mu.Lock()
	defer t.mu.Unlock()
	old := t.peers.Load()
	km := t.keys.Load()
	own := []Key{km.pub}
	if prev := t.previousKeys(); prev != nil {
		own = append(own, prev.pub)
	}
	cfgs, refused := vet(cfgs, own)
	logRefusals(t.log, old.refused, refused)
	keys := map[Key]bool{}
	for _, c := range cfgs {
		keys[c.Key] = true
	}
	byName := map[string]*peer{}
	for _, p := range old.list {
		byName[p.name] = p
	}
	next := &peerSnapshot{byKey: map[Key]*peer{}, byEndpoint: map[netip.AddrPort]*peer{}, refused: refused}
	var fresh []*peer
	for _, c := range cfgs {
		p := old.byKey[c.Key]
		if p == nil || p.cfgEndpoint != c.Endpoint || p.name != c.Name || !slices.Equal(p.allowed, c.Subnets) {
			np := newPeer(t, c, km)
			switch {
			case p != nil: // moved, renamed or given other subnets
				np.takeOver(p)
			case byName[c.Name] != nil && !keys[byName[c.Name].pub]:
				// The node rotated its key: its sessions stay valid
				// (they depend on no static key) until it rekeys.
				np.takeOver(byName[c.Name])
			default:
				fresh = append(fresh, np)
			}
			p = np
		}
		next.byKey[c.Key] = p
		next.byEndpoint[c.Endpoint] = p
		next.list = append(next.list, p)
	}
	t.peers.Store(next)
	// Offer a handshake to every peer new to this transport (all of them
	// on the first call: the sessions of an earlier run of this node are
	// gone and peers may still send on them), each after a random delay
	// so two nodes meeting rarely cross their initiations. A peer that
	// did not know this node yet, and dropped the offer, offers one in
	// turn when it learns of this node (a tulle peer does), or data
	// initiates at once (see initiate).
	for _, p := range fresh {
		time.AfterFunc(time.Duration(randUint32()%uint32(eagerJitter)), p.offer)
	}
	for k, p := range old.byKey {
		if next.byKey[k] != p {
			p.remove() // a peer taken over has nothing left to wipe
		}
	}
}

// vet splits cfgs into the peers to serve and those refused: a peer
// without key or endpoint is skipped; one that shares its key or its
// endpoint with another, or carries one of own (this node's keys), is
// refused, with every other claimant.
func vet(cfgs []PeerConfig, own []Key) (ok []PeerConfig, refused []PeerStatus) {
	keys := map[Key]int{}
	eps := map[netip.AddrPort]int{}
	for _, c := range cfgs {
		if !c.Key.IsZero() && c.Endpoint.IsValid() {
			keys[c.Key]++
			eps[unmap(c.Endpoint)]++
		}
	}
	for _, c := range cfgs {
		var why string
		switch {
		case c.Key.IsZero() || !c.Endpoint.IsValid():
			continue
		case slices.Contains(own, c.Key):
			why = "it carries this node's own public key"
		case keys[c.Key] > 1:
			why = fmt.Sprintf("%d peers carry its public key %s", keys[c.Key], c.Key.Fingerprint())
		case eps[unmap(c.Endpoint)] > 1:
			why = fmt.Sprintf("%d peers claim its endpoint %s", eps[unmap(c.Endpoint)], c.Endpoint)
		default:
			ok = append(ok, c)
			continue
		}
		refused = append(refused, PeerStatus{Name: c.Name, Key: c.Key, Endpoint: c.Endpoint, Refused: why})
	}
	return ok, refused
}

func unmap(a netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(a.Addr().Unmap(), a.Port()) }

// logRefusals warns of each refusal that is new since the last call.
func logRefusals(log *slog.Logger, was, now []PeerStatus) {
	for _, r := range now {
		if !slices.Contains(was, r) {
			log.Warn("WireGuard peer refused: no traffic to or from it until the conflict is gone", "peer", r.Name,
				"public_key", r.Key.Fingerprint(), "endpoint", r.Endpoint, "reason", r.Refused)
		}
	}
}

// Serves reports whether a is one of the peers' endpoints.
func (t *Transport) Serves(a netip.AddrPort) bool { return t.peers.Load().byEndpoint[a] != nil }

// SetMTU follows an underlay MTU change.
func (t *Transport) SetMTU(mtu int) { t.socks.SetMTU(mtu) }

// Receivers implements tunnel.Transport.
func (t *Transport) Receivers() []tunnel.ReceiveFunc {
	var fns []tunnel.ReceiveFunc
	for _, s := range t.socks {
		fns = append(fns, newReceiver(t, s).receive)
	}
	return fns
}

// Close implements tunnel.Transport.
func (t *Transport) Close() error {
	if t.closed.Swap(true) {
		return nil
	}
	close(t.done)
	err := t.socks.Close()
	t.wg.Wait()
	return err
}

// PeerStatus is what tullectl shows of a peer's WireGuard state.
type PeerStatus struct {
	Name          string
	Key           Key
	Endpoint      netip.AddrPort // where it is reached now (it may roam)
	LastHandshake time.Time      // zero: never
	// RxBytes and TxBytes are a kernel device's counts; the userspace
	// transport leaves counting to the datapath (tunnel.PeerStats).
	RxBytes, TxBytes uint64
	// Refused says why the peer is not served (it shares its key or
	// endpoint with another peer, or carries this node's key); "" when
	// it is.
	Refused string
}

// Status returns every peer's state, refused peers included.
func (t *Transport) Status() []PeerStatus {
	snap := t.peers.Load()
	out := slices.Clone(snap.refused)
	for _, p := range snap.list {
		st := PeerStatus{Name: p.name, Key: p.pub, Endpoint: *p.endpoint.Load()}
		if hs := p.lastHandshake.Load(); hs != 0 {
			st.LastHandshake = epoch.Add(time.Duration(hs))
		}
		out = append(out, st)
	}
	return out
}

// keypair is one session's keys and state.
type keypair struct {
	peer atomic.Pointer[peer] // moves when a new peer takes the sessions over

	send, recv cipher.AEAD
	nonce      atomic.Uint64
	created    int64 // mono
	initiator  bool
	// confirmed: the peer has used the session (an initiator's always
	// is); a responder's is promoted to current on its first message.
	confirmed     atomic.Bool
	local, remote uint32
	mu            sync.Mutex // replay
	replay        replayFilter
}

// usable reports whether the session may still carry messages.
func (kp *keypair) usable(now int64, t *Timers) bool {
	return kp != nil && now-kp.created < int64(t.RejectAfterTime)
}

// canSend reports whether a frame may still be sealed on the session: it
// is usable and has counters left for the frame's segments.
func (kp *keypair) canSend(now int64, t *Timers) bool {
	return kp.usable(now, t) && kp.nonce.Load() < rejectAfterMessages-tunnel.MaxPacket
}

// reserved holds an index between its choice and its keypair's keys: a
// message meeting it finds no session.
type reserved struct{}

var reservation = &reserved{}

// newIndex registers v (a keypair or a peer's handshake) under a fresh
// random index.
func (t *Transport) newIndex(v any) uint32 {
	for {
		i := randUint32()
		if _, taken := t.index.LoadOrStore(i, v); !taken {
			return i
		}
	}
}
