package udp

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"testing"

	"github.com/tulle-net/tulle/encap/internal/udpsock"
	"github.com/tulle-net/tulle/encap/internal/udpsock/udpsocktest"
	"github.com/tulle-net/tulle/internal/pool"
	"github.com/tulle-net/tulle/tunnel"
	"github.com/tulle-net/tulle/tunnel/tuntest"
)

func TestHeaderRoundTrip(t *testing.T) {
	tests := []Header{
		{Type: TypePacket, Count: 1},
		{Type: TypeFrame, FrameID: 0xbeef, Index: 0, Count: 1},
		{Type: TypeFrame, FrameID: 1, Index: 44, Count: 45},
		{Type: TypeFrame, FrameID: 65535, Index: 254, Count: 255},
	}
	for _, h := range tests {
		b := make([]byte, HeaderLen)
		h.Marshal(b)
		got, err := ParseHeader(b)
		h.Len = HeaderLen
		if err != nil || got != h {
			t.Errorf("round trip of %+v: got %+v, %v", h, got, err)
		}
	}
}

func TestParseHeaderRejects(t *testing.T) {
	tests := []struct {
		name string
		b    []byte
		want error
	}{
		{"empty", nil, ErrShort},
		{"short", []byte{0x11, 2, 0, 0, 0, 1, 0}, ErrShort},
		{"version 0", []byte{0x01, 2, 0, 0, 0, 1, 0, 0}, ErrVersion},
		{"version 2", []byte{0x21, 2, 0, 0, 0, 1, 0, 0}, ErrVersion},
		{"hlen 1", []byte{0x11, 1, 0, 0, 0, 1, 0, 0}, ErrBadHeader},
		{"hlen past end", []byte{0x11, 3, 0, 0, 0, 1, 0, 0}, ErrBadHeader},
		{"count 0", []byte{0x12, 2, 0, 0, 0, 0, 0, 0}, ErrBadHeader},
		{"index ≥ count", []byte{0x12, 2, 0, 0, 3, 3, 0, 0}, ErrBadHeader},
		{"packet with count 2", []byte{0x11, 2, 0, 0, 0, 2, 0, 0}, ErrBadHeader},
		{"unknown type", []byte{0x1f, 2, 0, 0, 0, 1, 0, 0}, ErrBadHeader},
	}
	for _, tt := range tests {
		if _, err := ParseHeader(tt.b); !errors.Is(err, tt.want) {
			t.Errorf("%s: ParseHeader = %v, want %v", tt.name, err, tt.want)
		}
	}
	// A longer header (a future extension) is skipped, not rejected.
	ext := []byte{0x11, 3, 0, 0, 0, 1, 0, 0, 0xaa, 0xbb, 0xcc, 0xdd, 0x45}
	if h, err := ParseHeader(ext); err != nil || h.Len != 12 {
		t.Errorf("extended header: %+v, %v", h, err)
	}
}

// drain runs a receiver until its reader is exhausted and returns copies of
// every frame's packet, with the frames themselves for inspection.
func drain(r *receiver, room int) (pkts [][]byte, frames []tunnel.Frame) {
	out := make([]tunnel.Frame, room)
	for {
		n, err := r.receive(out)
		if err != nil {
			return pkts, frames
		}
		for _, f := range out[:n] {
			pkts = append(pkts, append([]byte(nil), f.Packet()...))
			frames = append(frames, f)
		}
	}
}

func testTransport() *Transport {
	t := &Transport{opt: Options{Accept: func(a netip.AddrPort) bool { return a.Addr() != netip.MustParseAddr("198.18.0.66") && a.Port() == 8285 }},
		ctr: &Counters{}, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	t.senders = pool.New(2, func() *sender { return newSender(t) })
	return t
}

// layout runs the sender's train layout for one frame and returns the
// datagrams it would put on the wire.
func layout(pkt []byte, o tunnel.Offload, maxDg int) [][]byte {
	return layoutOn(testTransport(), pkt, o, maxDg)
}

// layoutOn lays out on tr's sender, whose frame ids go on counting.
func layoutOn(tr *Transport, pkt []byte, o tunnel.Offload, maxDg int) [][]byte {
	f := tunnel.Frame{Buf: append(make([]byte, tunnel.Headroom), pkt...), Off: tunnel.Headroom, Offload: o}
	s := newSender(tr)
	s.train(&udpsock.Socket{}, nil, &f, maxDg, 0) // lays out only: no socket is touched
	return s.b.Queued()
}

func TestTrainReassembly(t *testing.T) {
	src := netip.MustParseAddrPort("198.18.0.2:8285")
	pkt := tuntest.TCP(netip.MustParseAddr("100.96.2.1"), netip.MustParseAddr("100.96.1.1"), 20000)
	o := tuntest.TSO(pkt, 1400)
	dgs := layout(pkt, o, 1472)
	if len(dgs) != 14 {
		t.Fatalf("20040-byte packet laid out in %d datagrams, want 14", len(dgs))
	}
	joined := bytes.Join(dgs, nil)
	split := func(dgs ...[]byte) []udpsocktest.Msg {
		var m []udpsocktest.Msg
		for _, d := range dgs {
			m = append(m, udpsocktest.Msg{Data: d, Src: src})
		}
		return m
	}
	tests := []struct {
		name       string
		msgs       []udpsocktest.Msg
		frames     int
		incomplete uint64
	}{
		{"one GRO message (in place)", []udpsocktest.Msg{{Data: joined, GSO: 1472, Src: src}}, 1, 0},
		{"datagram by datagram", split(dgs...), 1, 0},
		{"GRO split in two", []udpsocktest.Msg{{Data: bytes.Join(dgs[:5], nil), GSO: 1472, Src: src}, {Data: bytes.Join(dgs[5:], nil), GSO: 1472, Src: src}}, 1, 0},
		{"lost middle datagram", split(append(append([][]byte{}, dgs[:6]...), dgs[7:]...)...), 0, 1},
		{"lost first datagram", split(dgs[1:]...), 0, 1},
		{"reordered", split(append(append(append([][]byte{}, dgs[:3]...), dgs[4], dgs[3]), dgs[5:]...)...), 0, 1},
		{"duplicate then whole", split(append(append([][]byte{}, dgs[:3]...), dgs...)...), 1, 1},
		{"unknown source", []udpsocktest.Msg{{Data: joined, GSO: 1472, Src: netip.MustParseAddrPort("198.18.0.66:8285")}}, 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tr := testTransport()
			fr := &udpsocktest.Reader{Msgs: tt.msgs}
			pkts, frames := drain(newReceiver(tr, fr.Read, true, false), 4)
			for i, f := range frames {
				if !bytes.Equal(pkts[i], pkt) || f.Offload != o || f.Addr != src {
					t.Fatalf("frame differs: %d bytes (want %d), offload %+v (want %+v), from %s", len(pkts[i]), len(pkt), f.Offload, o, f.Addr)
				}
			}
			if len(pkts) != tt.frames {
				t.Errorf("got %d frames, want %d", len(pkts), tt.frames)
			}
			if n := tr.ctr.Get(DropIncomplete); n != tt.incomplete {
				t.Errorf("drop_incomplete = %d, want %d", n, tt.incomplete)
			}
		})
	}
}

func TestReceiveManySmallPacketsInOneGROMessage(t *testing.T) {
	// 40 PACKET datagrams coalesced by GRO, read with room for 16 frames a
	// call: all 40 come out, in order, over three calls.
	src := netip.MustParseAddrPort("198.18.0.2:8285")
	var msg []byte
	var want [][]byte
	for i := range 40 {
		p := tuntest.TCP(netip.MustParseAddr("100.96.2.1"), netip.MustParseAddr("100.96.1.1"), 500)
		p[30] = byte(i)
		want = append(want, p)
		h := make([]byte, HeaderLen)
		Header{Type: TypePacket, Count: 1}.Marshal(h)
		msg = append(append(msg, h...), p...)
	}
	tr := testTransport()
	got, _ := drain(newReceiver(tr, (&udpsocktest.Reader{Msgs: []udpsocktest.Msg{{Data: msg, GSO: HeaderLen + 540, Src: src}}}).Read, true, false), 16)
	if len(got) != 40 {
		t.Fatalf("got %d packets, want 40", len(got))
	}
	for i := range got {
		if !bytes.Equal(got[i], want[i]) {
			t.Fatalf("packet %d differs", i)
		}
	}
}

// FuzzDecap feeds arbitrary datagrams (and GRO segment sizes) to the
// receive path and then through the offload check the TUN applies before
// anything reaches the kernel. It must never panic, and every frame it
// yields must lie inside its buffer.
func FuzzDecap(f *testing.F) {
	pkt := tuntest.TCP(netip.MustParseAddr("100.96.2.1"), netip.MustParseAddr("100.96.1.1"), 3000)
	f.Add(bytes.Join(layout(pkt, tuntest.TSO(pkt, 1400), 1472), nil), uint16(1472))
	f.Add(bytes.Join(layout(pkt, tuntest.TSO(pkt, 1400), 600), nil), uint16(600))
	f.Add([]byte{0x11, 2, 0, 0, 0, 1, 0, 0, 0x45}, uint16(0))
	f.Add([]byte{0x12, 2, 0, 1, 0, 1, 0, 0, 1, 1, 0, 50, 0, 20, 0, 16}, uint16(0))
	f.Add([]byte{0x12, 3, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0x12, 2, 0, 1, 1, 2, 0, 0}, uint16(12))
	f.Fuzz(func(t *testing.T, data []byte, gso uint16) {
		if len(data) > 65535 {
			return
		}
		tr := testTransport()
		src := netip.MustParseAddrPort("198.18.0.2:8285")
		fr := &udpsocktest.Reader{Msgs: []udpsocktest.Msg{{Data: data, GSO: int(gso), Src: src}, {Data: data, Src: src}}}
		r := newReceiver(tr, fr.Read, true, false)
		frames := make([]tunnel.Frame, 3)
		for range 1000 {
			n, err := r.receive(frames)
			if err != nil {
				return
			}
			for _, fr := range frames[:n] {
				if fr.Off < 0 || fr.Off > len(fr.Buf) {
					t.Fatalf("frame offset %d outside buffer of %d", fr.Off, len(fr.Buf))
				}
				tunnel.Addrs(fr.Packet())
				tunnel.ValidateOffload(fr.Packet(), fr.Offload)
			}
		}
		t.Fatal("receiver did not finish the input")
	})
}
