package udp

import (
	"bytes"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/tulle-net/tulle/encap/internal/udpsock/udpsocktest"
	"github.com/tulle-net/tulle/tunnel/tuntest"
)

// trainHead is the first datagram of a never-finished 45-datagram train.
func trainHead(id uint16) []byte {
	d := make([]byte, 1472)
	Header{Type: TypeFrame, FrameID: id, Index: 0, Count: 45}.Marshal(d)
	return d
}

// TestReassemblyBound floods the receive path the way an off-path attacker
// can: train starts with fresh frame ids from a forged peer endpoint, from
// many fresh ports on the peer's address, and from many peers. Memory must
// stay within TrainSlots per peer and MaxTrainBuffers in all, strangers must
// cost nothing, and real trains must still get through.
func TestReassemblyBound(t *testing.T) {
	peer := netip.MustParseAddrPort("198.18.0.2:8285")
	pkt := tuntest.TCP(netip.MustParseAddr("100.96.2.1"), netip.MustParseAddr("100.96.1.1"), 20000)
	good := layout(pkt, tuntest.TSO(pkt, 1400), 1472)

	tests := []struct {
		name        string
		flood       func(i int) udpsocktest.Msg
		wantBufs    int
		wantPeers   int
		wantUnknown uint64
	}{
		{"fresh frame ids from one peer endpoint", func(i int) udpsocktest.Msg {
			return udpsocktest.Msg{Data: trainHead(uint16(i)), Src: peer}
		}, TrainSlots, 1, 0},
		{"fresh ports on a peer's address", func(i int) udpsocktest.Msg {
			return udpsocktest.Msg{Data: trainHead(uint16(i)), Src: netip.AddrPortFrom(peer.Addr(), uint16(10000+i%50000))}
		}, 0, 0, 20000},
		{"a stranger", func(i int) udpsocktest.Msg {
			return udpsocktest.Msg{Data: trainHead(uint16(i)), Src: netip.MustParseAddrPort("198.18.0.66:8285")}
		}, 0, 0, 20000},
		{"many peers", func(i int) udpsocktest.Msg {
			return udpsocktest.Msg{Data: trainHead(uint16(i)), Src: netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 19, byte(i / 250), byte(1 + i%250)}), 8285)}
		}, MaxTrainBuffers, 20000, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tr := testTransport()
			fr := &udpsocktest.Reader{}
			for i := range 20000 {
				fr.Msgs = append(fr.Msgs, tt.flood(i))
			}
			r := newReceiver(tr, fr.Read, true, false)
			if pkts, _ := drain(r, 8); len(pkts) != 0 {
				t.Fatalf("flood produced %d frames", len(pkts))
			}
			if got := r.trains.alloc; got != tt.wantBufs {
				t.Errorf("reassembly buffers = %d, want %d", got, tt.wantBufs)
			}
			if got := len(r.trains.peers); got != tt.wantPeers {
				t.Errorf("peers with reassembly state = %d, want %d", got, tt.wantPeers)
			}
			if got := tr.ctr.Get(DropUnknownSource); got != tt.wantUnknown {
				t.Errorf("drop_unknown_source = %d, want %d", got, tt.wantUnknown)
			}
			if tt.wantBufs > 0 && tr.ctr.Get(DropIncomplete)+tr.ctr.Get(DropTrainEvicted) == 0 {
				t.Error("abandoned trains were not counted")
			}
			// The real peer's train, datagram by datagram, still arrives.
			for _, d := range good {
				fr.Msgs = append(fr.Msgs, udpsocktest.Msg{Data: d, Src: peer})
			}
			got, _ := drain(r, 8)
			if len(got) != 1 || !bytes.Equal(got[0], pkt) {
				t.Fatalf("after the flood, a real train gave %d frames", len(got))
			}
			if r.trains.alloc > MaxTrainBuffers {
				t.Errorf("reassembly buffers = %d, above the cap %d", r.trains.alloc, MaxTrainBuffers)
			}
		})
	}
}

// TestReassemblyForgetsDepartedPeers checks that a peer's state goes once
// it stops being accepted, and stale trains once they time out.
func TestReassemblyForgetsDepartedPeers(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	accepted := map[netip.AddrPort]bool{}
	tr := testTransport()
	tr.opt.Accept = func(a netip.AddrPort) bool { return accepted[a] }
	fr := &udpsocktest.Reader{}
	r := newReceiver(tr, fr.Read, true, false)
	r.clock = func() time.Time { return now }
	var srcs []netip.AddrPort
	for i := range 10 {
		src := netip.MustParseAddrPort(fmt.Sprintf("198.18.0.%d:8285", i+1))
		accepted[src] = true
		srcs = append(srcs, src)
		fr.Msgs = append(fr.Msgs, udpsocktest.Msg{Data: trainHead(1), Src: src})
	}
	drain(r, 8)
	if len(r.trains.peers) != 10 || r.trains.alloc != 10 {
		t.Fatalf("state for %d peers in %d buffers, want 10 and 10", len(r.trains.peers), r.trains.alloc)
	}
	// Five peers leave; the next batch after a sweep interval frees them.
	for _, s := range srcs[:5] {
		delete(accepted, s)
	}
	now = now.Add(sweepInterval + time.Millisecond)
	fr.Msgs = append(fr.Msgs, udpsocktest.Msg{Data: []byte{0}, Src: srcs[5]})
	drain(r, 8)
	if len(r.trains.peers) != 5 || len(r.trains.free) != 5 {
		t.Fatalf("after 5 peers left: state for %d peers, %d free buffers; want 5 and 5", len(r.trains.peers), len(r.trains.free))
	}
	// The rest time out.
	now = now.Add(trainTimeout + sweepInterval)
	fr.Msgs = append(fr.Msgs, udpsocktest.Msg{Data: []byte{0}, Src: srcs[5]})
	drain(r, 8)
	if len(r.trains.peers) != 0 || len(r.trains.free) != 10 {
		t.Fatalf("after the timeout: state for %d peers, %d free buffers; want 0 and 10", len(r.trains.peers), len(r.trains.free))
	}
	if got := tr.ctr.Get(DropIncomplete); got != 10 {
		t.Errorf("drop_incomplete = %d, want 10", got)
	}
}

// TestInterleavedTrains: two trains of one peer interleaved datagram by
// datagram both arrive (up to TrainSlots may be in flight).
func TestInterleavedTrains(t *testing.T) {
	src := netip.MustParseAddrPort("198.18.0.2:8285")
	p1 := tuntest.TCP(netip.MustParseAddr("100.96.2.1"), netip.MustParseAddr("100.96.1.1"), 9000)
	p2 := tuntest.TCP(netip.MustParseAddr("100.96.2.2"), netip.MustParseAddr("100.96.1.1"), 9000)
	tr := testTransport()
	d1, d2 := layoutOn(tr, p1, tuntest.TSO(p1, 1400), 1472), layoutOn(tr, p2, tuntest.TSO(p2, 1400), 1472)
	fr := &udpsocktest.Reader{}
	for i := range d1 {
		fr.Msgs = append(fr.Msgs, udpsocktest.Msg{Data: d1[i], Src: src}, udpsocktest.Msg{Data: d2[i], Src: src})
	}
	got, _ := drain(newReceiver(tr, fr.Read, true, false), 4)
	if len(got) != 2 || !bytes.Equal(got[0], p1) || !bytes.Equal(got[1], p2) {
		t.Fatalf("interleaved trains: got %d frames", len(got))
	}
}
