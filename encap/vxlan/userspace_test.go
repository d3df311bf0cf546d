package vxlan

import (
	"bytes"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"testing"

	"github.com/tulle-net/tulle/encap/internal/udpsock"
	"github.com/tulle-net/tulle/encap/internal/udpsock/udpsocktest"
	"github.com/tulle-net/tulle/internal/inet"
	"github.com/tulle-net/tulle/tunnel"
	"github.com/tulle-net/tulle/tunnel/tuntest"
)

var (
	macA, _ = net.ParseMAC("0e:00:00:00:00:0a")
	macB, _ = net.ParseMAC("0e:00:00:00:00:0b")
	epA     = netip.MustParseAddrPort("198.18.0.1:8472")
	epB     = netip.MustParseAddrPort("198.18.0.2:8472")
)

// testNode is a Userspace without sockets: sends land in conn.
func testNode(mac net.HardwareAddr, peers ...Endpoint) (*Userspace, *udpsocktest.Conn) {
	u := newUserspace(UserspaceConfig{VNI: 1, Port: 8472, MAC: mac, MTU: 1500, Counters: &Counters{}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	c := &udpsocktest.Conn{}
	vs := &udpsock.Socket{BC: c}
	vs.SetMTU(1500)
	u.socks = udpsock.Sockets{vs}
	u.SetPeers(peers)
	return u, c
}

func frameOf(p []byte, o tunnel.Offload, to netip.AddrPort) tunnel.Frame {
	return tunnel.Frame{Buf: append(make([]byte, tunnel.Headroom), p...), Off: tunnel.Headroom, Offload: o, Addr: to}
}

// receiveAll runs a receiver over msgs and returns the packets it hands
// on, super-packets cut back into their segments as the kernel would, with
// the number of frames.
func receiveAll(t *testing.T, u *Userspace, msgs []udpsocktest.Msg) (pkts [][]byte, from []netip.AddrPort, frames int) {
	t.Helper()
	r := newVReceiver(u, (&udpsocktest.Reader{Msgs: msgs}).Read)
	fs := make([]tunnel.Frame, 64)
	out := make([]byte, 100000)
	for {
		n, err := r.receive(fs)
		if err != nil {
			return pkts, from, frames
		}
		for _, f := range fs[:n] {
			frames++
			if f.Offload == (tunnel.Offload{}) {
				pkts = append(pkts, append([]byte(nil), f.Packet()...))
				from = append(from, f.Addr)
				continue
			}
			m, seg, err := tunnel.Segment(out, f.Packet(), nil, f.Offload)
			if err != nil {
				t.Fatalf("received super-packet does not segment: %v (%+v)", err, f.Offload)
			}
			for b := out[:m]; len(b) > 0; {
				k := min(seg, len(b))
				pkts = append(pkts, append([]byte(nil), b[:k]...))
				from = append(from, f.Addr)
				b = b[k:]
			}
		}
	}
}

// TestWireFormat: one plain packet is RFC 7348's datagram, byte for byte,
// as a Linux VXLAN device in flannel's setup expects it.
func TestWireFormat(t *testing.T) {
	a, conn := testNode(macA, Endpoint{Addr: epB, MAC: macB})
	pkt := tuntest.TCP(netip.MustParseAddr("100.64.1.2"), netip.MustParseAddr("100.64.2.3"), 100)
	if err := a.Send([]tunnel.Frame{frameOf(pkt, tunnel.Offload{}, epB)}); err != nil {
		t.Fatal(err)
	}
	if len(conn.Sent) != 1 || conn.Sent[0].Src != epB {
		t.Fatalf("sent %+v, want one datagram to %s", conn.Sent, epB)
	}
	want := []byte{0x08, 0, 0, 0, 0, 0, 1, 0}
	want = append(want, macB...)
	want = append(want, macA...)
	want = append(want, 0x08, 0x00)
	want = append(want, pkt...)
	if !bytes.Equal(conn.Sent[0].Data, want) {
		t.Errorf("datagram\n got % x\nwant % x", conn.Sent[0].Data[:EncapLen], want[:EncapLen])
	}
	// IPv6 inside: EtherType 86dd.
	p6 := tuntest.TCP(netip.MustParseAddr("fd00:1::2"), netip.MustParseAddr("fd00:2::3"), 10)
	a.Send([]tunnel.Frame{frameOf(p6, tunnel.Offload{}, epB)})
	if got := conn.Sent[1].Data[HeaderLen+12:]; got[0] != 0x86 || got[1] != 0xdd {
		t.Errorf("IPv6 EtherType % x", got[:2])
	}
}

func TestRoundTrip(t *testing.T) {
	a, conn := testNode(macA, Endpoint{Addr: epB, MAC: macB})
	b, _ := testNode(macB, Endpoint{Addr: epA, MAC: macA})
	for _, tt := range []struct {
		name     string
		src, dst netip.Addr
		payload  int
		mss      int
	}{
		{"v4 super-packet", netip.MustParseAddr("100.64.1.2"), netip.MustParseAddr("100.64.2.3"), 62000, 1398},
		{"v6 super-packet", netip.MustParseAddr("fd00:1::2"), netip.MustParseAddr("fd00:2::3"), 60000, 1378},
		{"small", netip.MustParseAddr("100.64.1.2"), netip.MustParseAddr("100.64.2.3"), 50, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			conn.Sent, conn.Messages = nil, 0
			pkt := tuntest.TCP(tt.src, tt.dst, tt.payload)
			o := tuntest.PartialCsum(pkt)
			ip := tuntest.IPHeaderLen(pkt)
			if tt.mss > 0 {
				o = tuntest.TSO(pkt, tt.mss)
			} else {
				// The kernel completes IPv4 headers; only L4 is partial.
				binary.BigEndian.PutUint16(pkt[10:], inet.Checksum(pkt[:20], 0))
				binary.BigEndian.PutUint16(pkt[ip+16:], inet.Fold(inet.PseudoHeader(tt.src.AsSlice(), tt.dst.AsSlice(), 6, len(pkt)-ip)))
			}
			if err := a.Send([]tunnel.Frame{frameOf(pkt, o, epB)}); err != nil {
				t.Fatal(err)
			}
			// A kernel VXLAN sender picks its source port per flow: only the
			// address identifies the peer. GRO hands the datagrams over as one
			// message where their sizes allow.
			var msgs []udpsocktest.Msg
			seg := len(conn.Sent[0].Data)
			var joined []byte
			for _, d := range conn.Sent {
				if len(d.Data) > 1472 {
					t.Fatalf("datagram of %d bytes exceeds the underlay", len(d.Data))
				}
				joined = append(joined, d.Data...)
			}
			msgs = append(msgs, udpsocktest.Msg{Data: joined, GSO: seg, Src: netip.AddrPortFrom(epA.Addr(), 53211)})
			var sent [][]byte
			for _, d := range conn.Sent {
				sent = append(sent, d.Data[EncapLen:])
			}
			pkts, from, frames := receiveAll(t, b, msgs)
			// One GRO message of one flow's segments: merged into one frame
			// (a GSO send holds at most 64 segments and 65000 bytes, so
			// a 64 KB super-packet takes two).
			if frames > 2 {
				t.Errorf("%d frames handed on, want the segments merged", frames)
			}
			want := 1
			if tt.mss > 0 {
				want = (tt.payload + tt.mss - 1) / tt.mss
				if conn.Messages > 2 {
					t.Errorf("%d messages for one super-packet, want at most 2 UDP GSO sends", conn.Messages)
				}
			}
			if len(pkts) != want {
				t.Fatalf("received %d packets, want %d", len(pkts), want)
			}
			var payload []byte
			for i, p := range pkts {
				if from[i] != epA {
					t.Fatalf("frame from %s, want the peer's endpoint %s", from[i], epA)
				}
				if !checksumsValid(p) {
					t.Fatalf("packet %d: checksums invalid", i)
				}
				// Merged and cut again, every segment is what was sent.
				if !bytes.Equal(p, sent[i]) {
					t.Fatalf("packet %d differs from the segment sent", i)
				}
				payload = append(payload, p[ip+20:]...)
			}
			if !bytes.Equal(payload, pkt[ip+20:]) {
				t.Error("payloads differ")
			}
		})
	}
	if n := a.ctr.Get(Segmented); n != 2 {
		t.Errorf("vxlan_segmented = %d, want 2", n)
	}
}

// checksumsValid checks an IPv4 header checksum and the TCP checksum.
func checksumsValid(p []byte) bool {
	if p[0]>>4 == 4 {
		return inet.Checksum(p[:20], 0) == 0 && inet.Checksum(p[20:], inet.PseudoHeader(p[12:16], p[16:20], 6, len(p)-20)) == 0
	}
	return inet.Checksum(p[40:], inet.PseudoHeader(p[8:24], p[24:40], 6, len(p)-40)) == 0
}

// TestReceiveRejects: what is not a VXLAN peer's IP packet for this VTEP
// is dropped and counted; nothing of it reaches the datapath.
func TestReceiveRejects(t *testing.T) {
	pkt := tuntest.TCP(netip.MustParseAddr("100.64.2.3"), netip.MustParseAddr("100.64.1.2"), 40)
	good := func() []byte {
		d := []byte{0x08, 0, 0, 0, 0, 0, 1, 0}
		d = append(d, macA...)
		d = append(d, macB...)
		d = append(d, 0x08, 0x00)
		return append(d, pkt...)
	}
	from := netip.AddrPortFrom(epB.Addr(), 40001)
	tests := []struct {
		name    string
		mutate  func([]byte) []byte
		src     netip.AddrPort
		counter Counter
	}{
		{"unknown source", nil, netip.MustParseAddrPort("198.18.0.66:40001"), DropUnknownSource},
		{"peer's port other than VXLAN's is fine, another address is not", nil, netip.MustParseAddrPort("198.18.0.3:8472"), DropUnknownSource},
		{"another VNI", func(d []byte) []byte { d[6] = 2; return d }, from, DropBadVNI},
		{"I flag clear", func(d []byte) []byte { d[0] = 0; return d }, from, DropMalformed},
		{"not for this VTEP", func(d []byte) []byte { d[HeaderLen+5] = 0xff; return d }, from, DropNotForUs},
		{"broadcast", func(d []byte) []byte { copy(d[HeaderLen:], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}); return d }, from, DropNotForUs},
		{"ARP", func(d []byte) []byte { d[HeaderLen+12], d[HeaderLen+13] = 0x08, 0x06; return d }, from, DropMalformed},
		{"IPv6 EtherType, IPv4 inside", func(d []byte) []byte { d[HeaderLen+12], d[HeaderLen+13] = 0x86, 0xdd; return d }, from, DropMalformed},
		{"truncated", func(d []byte) []byte { return d[:EncapLen+10] }, from, DropMalformed},
		{"inner length beyond the datagram", func(d []byte) []byte { return d[:len(d)-1] }, from, DropMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, _ := testNode(macA, Endpoint{Addr: epB, MAC: macB})
			d := good()
			if tt.mutate != nil {
				d = tt.mutate(d)
			}
			pkts, _, _ := receiveAll(t, a, []udpsocktest.Msg{{Data: d, Src: tt.src}})
			if len(pkts) != 0 {
				t.Fatalf("%d packets passed", len(pkts))
			}
			if got := a.ctr.Get(tt.counter); got != 1 {
				t.Errorf("%s = %d, want 1", tt.counter, got)
			}
		})
	}
	// Ethernet padding after the IP packet is trimmed.
	a, _ := testNode(macA, Endpoint{Addr: epB, MAC: macB})
	pkts, _, _ := receiveAll(t, a, []udpsocktest.Msg{{Data: append(good(), 0, 0, 0, 0), Src: from}})
	if len(pkts) != 1 || !bytes.Equal(pkts[0], pkt) {
		t.Errorf("padded frame: %d packets", len(pkts))
	}
}

func TestSendDrops(t *testing.T) {
	a, conn := testNode(macA, Endpoint{Addr: epB, MAC: macB})
	pkt := tuntest.TCP(netip.MustParseAddr("100.64.1.2"), netip.MustParseAddr("100.64.2.3"), 100)
	big := tuntest.TCP(netip.MustParseAddr("100.64.1.2"), netip.MustParseAddr("100.64.2.3"), 1460)
	bad := tuntest.TSO(pkt, 50)
	bad.CsumStart = 3
	frames := []tunnel.Frame{
		frameOf(pkt, tunnel.Offload{}, netip.MustParseAddrPort("198.18.0.9:8472")), // a peer that left
		frameOf(pkt, bad, epB),
		frameOf(big, tunnel.Offload{}, epB),       // 1500 + 22 > 1472
		frameOf(big, tuntest.TSO(big, 1460), epB), // segments too large for the underlay
		frameOf(pkt, tunnel.Offload{}, epB),       // fine
	}
	if err := a.Send(frames); err != nil {
		t.Fatal(err)
	}
	for c, want := range map[Counter]uint64{DropNoPeer: 1, DropOffload: 1, DropTooBig: 2, DatagramsOut: 1} {
		if got := a.ctr.Get(c); got != want {
			t.Errorf("%s = %d, want %d", c, got, want)
		}
	}
	if len(conn.Sent) != 1 {
		t.Errorf("%d datagrams sent, want 1", len(conn.Sent))
	}
	// Peers replaced: the old one's frames drop, its datagrams too.
	a.SetPeers(nil)
	a.Send([]tunnel.Frame{frameOf(pkt, tunnel.Offload{}, epB)})
	if a.ctr.Get(DropNoPeer) != 2 || a.Serves(epB) {
		t.Error("a removed peer is still served")
	}
}

// TestCoalesce: segments merge only while they continue one flow in
// order with valid checksums; whatever breaks the run arrives on its own,
// and nothing is lost or changed.
func TestCoalesce(t *testing.T) {
	a, conn := testNode(macA, Endpoint{Addr: epB, MAC: macB})
	b, _ := testNode(macB, Endpoint{Addr: epA, MAC: macA})
	src, dst := netip.MustParseAddr("100.64.1.2"), netip.MustParseAddr("100.64.2.3")
	segs := func(payload int) [][]byte {
		conn.Sent = nil
		// A 32-byte TCP header: NOP, NOP, timestamps, as Linux sends.
		pkt := tuntest.TCP(src, dst, payload+12)
		pkt[20+12] = 8 << 4
		copy(pkt[40:], []byte{1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2})
		pkt[20+13] = 0x10 // ACK
		if err := a.Send([]tunnel.Frame{frameOf(pkt, tuntest.TSO(pkt, 1000), epB)}); err != nil {
			t.Fatal(err)
		}
		var out [][]byte
		for _, d := range conn.Sent {
			out = append(out, d.Data)
		}
		return out
	}
	tests := []struct {
		name   string
		dgs    func() [][]byte
		frames int
	}{
		{"one run", func() [][]byte { return segs(10000) }, 1},
		{"a bad checksum breaks the run", func() [][]byte {
			d := segs(10000)
			d[4][len(d[4])-1] ^= 1
			return d
		}, 3},
		{"out of order", func() [][]byte {
			d := segs(10000)
			d[3], d[4] = d[4], d[3]
			return d
		}, 4},
		{"another flow in between", func() [][]byte {
			d := segs(10000)
			o := append([]byte(nil), d[2]...)
			o[EncapLen+20] ^= 1 // another source port
			fixTCP(o[EncapLen:])
			return append(d[:3], append([][]byte{o}, d[3:]...)...)
		}, 3},
		{"PSH on the first: nothing merges into it", func() [][]byte {
			d := segs(3000)
			d[0][EncapLen+20+13] |= 0x08 // PSH
			fixTCP(d[0][EncapLen:])
			return d
		}, 2},
		{"PSH ends the run", func() [][]byte {
			d := segs(10000)
			d[1][EncapLen+20+13] |= 0x08 // PSH
			fixTCP(d[1][EncapLen:])
			return d
		}, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := tt.dgs()
			// Datagrams of equal size share a GRO message; sizes differ only
			// at the end.
			msg := udpsocktest.Msg{Data: bytesJoin(d), GSO: len(d[0]), Src: netip.AddrPortFrom(epA.Addr(), 40000)}
			pkts, _, frames := receiveAll(t, b, []udpsocktest.Msg{msg})
			if frames != tt.frames {
				t.Errorf("%d frames, want %d", frames, tt.frames)
			}
			if len(pkts) != len(d) {
				t.Fatalf("%d packets out of %d datagrams", len(pkts), len(d))
			}
			for i := range d {
				if !bytes.Equal(pkts[i], d[i][EncapLen:]) && checksumsValid(d[i][EncapLen:]) {
					t.Errorf("packet %d changed", i)
				}
			}
		})
	}
}

func bytesJoin(d [][]byte) []byte {
	var out []byte
	for _, x := range d {
		out = append(out, x...)
	}
	return out
}

// fixTCP recomputes an IPv4 TCP segment's checksum.
func fixTCP(p []byte) {
	p[36], p[37] = 0, 0
	binary.BigEndian.PutUint16(p[36:], inet.Checksum(p[20:], inet.PseudoHeader(p[12:16], p[16:20], 6, len(p)-20)))
}
