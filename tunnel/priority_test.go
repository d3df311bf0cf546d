package tunnel

import (
	"encoding/binary"
	"net/netip"
	"testing"
)

func TestPrioritize(t *testing.T) {
	a, b := netip.MustParseAddr("100.64.1.2"), netip.MustParseAddr("100.64.2.3")
	pkt := func(sport uint16, size int, gso bool) Frame {
		p := make([]byte, size)
		p[0], p[9] = 0x45, 6
		binary.BigEndian.PutUint16(p[2:], uint16(size))
		s, d := a.As4(), b.As4()
		copy(p[12:], s[:])
		copy(p[16:], d[:])
		binary.BigEndian.PutUint16(p[20:], sport)
		f := Frame{Buf: p}
		if gso {
			f.Offload = Offload{Flags: FlagNeedsCsum, GSOType: GSOTCPv4, GSOSize: 1400, CsumStart: 20, CsumOffset: 16}
		}
		return f
	}
	const bulk, ping, other = 1, 2, 3
	for _, tt := range []struct {
		name  string
		in    []Frame
		order []uint16 // source ports after
		moved int
	}{
		{"small of another flow goes first", []Frame{pkt(bulk, 60000, true), pkt(bulk, 60000, true), pkt(ping, 60, false)}, []uint16{ping, bulk, bulk}, 1},
		{"small of the bulk flow stays behind it", []Frame{pkt(bulk, 60000, true), pkt(bulk, 100, false), pkt(ping, 60, false)}, []uint16{ping, bulk, bulk}, 1},
		{"order among small kept", []Frame{pkt(bulk, 60000, true), pkt(ping, 60, false), pkt(other, 60, false), pkt(ping, 80, false)}, []uint16{ping, other, ping, bulk}, 3},
		{"large plain packets stay", []Frame{pkt(bulk, 60000, true), pkt(other, 1400, false)}, []uint16{bulk, other}, 0},
		{"nothing to do", []Frame{pkt(ping, 60, false)}, []uint16{ping}, 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if n := prioritize(tt.in); n != tt.moved {
				t.Errorf("%d ahead, want %d", n, tt.moved)
			}
			for i, f := range tt.in {
				if got := binary.BigEndian.Uint16(f.Buf[20:]); got != tt.order[i] {
					t.Fatalf("frame %d from port %d, want %d (order %v)", i, got, tt.order[i], tt.order)
				}
			}
			// Within the bulk flow, the small packet still follows the
			// super-packet.
			if tt.name == "small of the bulk flow stays behind it" && len(tt.in[1].Buf) != 60000 {
				t.Error("the bulk flow was reordered")
			}
		})
	}
}
