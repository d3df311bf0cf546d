package node

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"log/slog"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/tulle-net/tulle/encap"
	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/lease"
	"github.com/tulle-net/tulle/tunnel"
	"github.com/tulle-net/tulle/tunnel/tuntest"
)

// The backend docs/architecture.md's "Adding a backend" writes: a
// capability, a Backend (the table's row) and a Running. It is all a new
// backend is; nothing else in tulle learns its name.

type echoCaps struct {
	Port uint16 `json:"port"`
}

func (echoCaps) Reach(theirs encap.Capability, pair encap.Pair) (encap.Path, string) {
	ep := pair.Endpoint(theirs.(echoCaps).Port)
	if !ep.IsValid() {
		return encap.Path{}, "no underlay address in a family this node has"
	}
	return encap.Path{Class: encap.Userspace, Endpoint: ep}, ""
}

type echoBackend struct{ port *uint }

func (echoBackend) Name() string      { return "echo" }
func (echoBackend) Best() encap.Class { return encap.Userspace }
func (echoBackend) Cleanup() error    { return nil }
func (b echoBackend) AddFlags(fs *flag.FlagSet) {
	fs.UintVar(b.port, "echo-port", 7, "the echo backend's port")
}

func (b echoBackend) Check(*netconf.Config) error {
	if *b.port == 0 || *b.port > 65535 {
		return netconf.Errorf("flag --echo-port: %d out of range 1-65535", *b.port)
	}
	return nil
}

func (echoBackend) Parse(raw json.RawMessage) (encap.Capability, error) {
	var c echoCaps
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, err
	}
	if c.Port == 0 {
		return nil, errors.New("no port")
	}
	return c, nil
}

func (b echoBackend) Start(encap.Env) (encap.Running, error) {
	return &echoRunning{port: uint16(*b.port), t: newChanTransport()}, nil
}

type echoRunning struct {
	port  uint16
	t     *chanTransport
	mu    sync.Mutex
	peers []encap.Assignment
}

func (r *echoRunning) Capability() encap.Capability  { return echoCaps{Port: r.port} }
func (r *echoRunning) Transport() encap.Transport    { return r.t }
func (r *echoRunning) Kernel() tunnel.KernelPath     { return nil }
func (r *echoRunning) Sizes(underlay int) (int, int) { return underlay - 100, 0 }
func (r *echoRunning) Attach([]netip.Prefix) error   { return nil }
func (r *echoRunning) SetMTU(int)                    {}
func (r *echoRunning) Counters() encap.Counters      { return encap.Counters{Component: "echo"} }
func (r *echoRunning) Close() error                  { return r.t.Close() }
func (r *echoRunning) SetPeers(as []encap.Assignment) {
	r.mu.Lock()
	r.peers = as
	r.mu.Unlock()
}

// chanTransport is a transport over channels: sent frames come out of
// sent, frames put into recv are received from the underlay.
type chanTransport struct {
	sent, recv chan tunnel.Frame
	done       chan struct{}
	once       sync.Once
}

func newChanTransport() *chanTransport {
	return &chanTransport{sent: make(chan tunnel.Frame, 16), recv: make(chan tunnel.Frame, 16), done: make(chan struct{})}
}

func (t *chanTransport) Send(frames []tunnel.Frame) error {
	for _, f := range frames {
		t.sent <- tunnel.Frame{Buf: append([]byte(nil), f.Packet()...), Addr: f.Addr}
	}
	return nil
}

func (t *chanTransport) Receivers() []tunnel.ReceiveFunc {
	return []tunnel.ReceiveFunc{func(frames []tunnel.Frame) (int, error) {
		select {
		case f := <-t.recv:
			// The receiver owns the buffers it fills (as udp's do).
			frames[0].Off = tunnel.Headroom
			frames[0].Buf = append(make([]byte, tunnel.Headroom), f.Buf...)
			frames[0].Offload, frames[0].Addr = tunnel.Offload{}, f.Addr
			return 1, nil
		case <-t.done:
			return 0, errors.New("closed")
		}
	}}
}

func (t *chanTransport) Close() error               { t.once.Do(func() { close(t.done) }); return nil }
func (t *chanTransport) Serves(netip.AddrPort) bool { return true }
func (t *chanTransport) SetMTU(int)                 {}

// oneSnapshot is a lease store whose peers never change.
type oneSnapshot struct {
	lease.Store
	peers []lease.Peer
}

func (s oneSnapshot) WatchPeers(ctx context.Context, _ string) (<-chan []lease.Peer, error) {
	ch := make(chan []lease.Peer, 1)
	ch <- s.peers
	return ch, nil
}

// TestAddingABackend follows docs/architecture.md's "Adding a backend"
// with the echo backend above, without root: registered in a table, its
// flag parses and is checked, the node starts it and publishes its
// capability, Select picks it for a peer that speaks it, the backend
// learns the peer, and the datapath carries packets both ways through its
// transport.
func TestAddingABackend(t *testing.T) {
	table := encap.Table{echoBackend{port: new(uint)}}
	fs := flag.NewFlagSet("tulled", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	for _, b := range table {
		b.AddFlags(fs)
	}
	if err := fs.Parse([]string{"--echo-port", "7000"}); err != nil {
		t.Fatal(err)
	}
	c := Config{Node: "a", Net: &netconf.Config{EnableIPv4: true, Backend: netconf.Backend{Type: encap.Auto}}, Backends: table}
	if err := table[0].Check(c.Net); err != nil {
		t.Fatal(err)
	}
	u := encap.Underlay{Iface: "eth0", MTU: 1500, IP4: netip.MustParseAddr("198.18.0.1")}
	log := slog.New(slog.DiscardHandler)
	fw := newForwarder(c, u, log)
	sp, err := startBackends(c, u, fw.peers.ByAddr, log)
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	if got := sp.attrs(table, c.Net, u).Backends["echo"]; string(got) != `{"port":7000}` {
		t.Errorf("published capability %s, want {\"port\":7000}", got)
	}
	if mtu, _ := sp.sizes(1500); mtu != 1400 {
		t.Errorf("node MTU %d, want the echo backend's 1400", mtu)
	}

	local := netip.MustParsePrefix("100.64.1.0/24")
	fw.peers.Set([]netip.Prefix{local}, nil)
	dev := tuntest.NewChanTUN()
	fw.attach(dev, sp, 1400)
	var routes [][]tunnel.PeerRoute
	fw.routes = func(r []tunnel.PeerRoute) { routes = append(routes, r) }
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go fw.dp.Run(ctx)

	peer := lease.Peer{Node: "b", Subnet: netip.MustParsePrefix("100.64.2.0/24"),
		Attrs: lease.Attrs{PublicIP: netip.MustParseAddr("198.18.0.2"), Backends: map[string]json.RawMessage{"echo": json.RawMessage(`{"port":7001}`)}}}
	pe := &peering{store: oneSnapshot{peers: []lease.Peer{peer}}, node: "a", table: table, local: sp.local(c.Net.Backend.Type, u),
		subnets: []netip.Prefix{local}, fw: fw, sp: sp, log: log}
	go pe.run(ctx)
	deadline := time.Now().Add(5 * time.Second)
	for pe.snapshots.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the peer snapshot was never applied")
		}
		time.Sleep(time.Millisecond)
	}
	if v := pe.view(); len(v) != 1 || v[0].Backend != "echo" || v[0].Endpoint.String() != "198.18.0.2:7001" {
		t.Fatalf("plan %+v, want peer b over echo at 198.18.0.2:7001", v)
	}
	r := sp[0].Running.(*echoRunning)
	r.mu.Lock()
	got := r.peers
	r.mu.Unlock()
	if len(got) != 1 || got[0].Peer.Node != "b" || len(got[0].Subnets) != 1 {
		t.Errorf("the backend learnt %+v, want peer b with its subnet", got)
	}

	out := tuntest.TCP(netip.MustParseAddr("100.64.1.5"), netip.MustParseAddr("100.64.2.5"), 100)
	dev.Inbound <- tuntest.Packet{Data: out}
	select {
	case f := <-r.t.sent:
		if f.Addr.String() != "198.18.0.2:7001" || string(f.Buf) != string(out) {
			t.Errorf("sent to %s (%d bytes), want the packet to 198.18.0.2:7001", f.Addr, len(f.Buf))
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the datapath never sent the packet through the echo transport")
	}
	in := tuntest.TCP(netip.MustParseAddr("100.64.2.5"), netip.MustParseAddr("100.64.1.5"), 100)
	r.t.recv <- tunnel.Frame{Buf: in, Addr: netip.MustParseAddrPort("198.18.0.2:7001")}
	select {
	case p := <-dev.Outbound:
		if string(p.Data) != string(in) {
			t.Errorf("wrote %d bytes to the TUN, want the received packet", len(p.Data))
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the datapath never wrote the received packet")
	}
}
