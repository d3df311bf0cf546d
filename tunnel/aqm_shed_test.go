package tunnel_test

import (
	"bytes"
	"net/netip"
	"testing"

	"github.com/tulle-net/tulle/tunnel"
	"github.com/tulle-net/tulle/tunnel/tuntest"
)

// TestShed checks what the AQM does to a batch's largest frame: marks an
// ECN-capable one, trims a TCP super-packet by exactly its last segment
// (every other segment the receiver ends up with is the original's,
// byte for byte), leaves anything else out.
func TestShed(t *testing.T) {
	v4s, v4d := netip.MustParseAddr("100.64.1.2"), netip.MustParseAddr("100.64.2.3")
	v6s, v6d := netip.MustParseAddr("fd00:1::2"), netip.MustParseAddr("fd00:2::3")
	small := func() tunnel.Frame { p := tuntest.TCP(v4s, v4d, 10); return frame(p, tuntest.PartialCsum(p)) }
	tso := func(src, dst netip.Addr, payload, mss int) tunnel.Frame {
		p := tuntest.TCP(src, dst, payload)
		return frame(p, tuntest.TSO(p, mss))
	}
	ect := func(f tunnel.Frame) tunnel.Frame { f.Packet()[1] |= 2; return f }
	uso := func() tunnel.Frame {
		f := tso(v4s, v4d, 4000, 1000)
		f.Offload.GSOType = tunnel.GSOUDPL4
		return f
	}
	for _, tt := range []struct {
		name     string
		batch    []tunnel.Frame
		sig      tunnel.Signal
		drop     int
		trimmed  int // the frame trimmed or marked
		segsLeft int // segments it carries after a trim
	}{
		{"ECN-capable super-packet: marked", []tunnel.Frame{small(), ect(tso(v4s, v4d, 6000, 1400))}, tunnel.SignalMark, -1, 1, 0},
		{"v4 super-packet, short tail: last segment trimmed", []tunnel.Frame{small(), tso(v4s, v4d, 6000, 1400), small()}, tunnel.SignalTrim, -1, 1, 4},
		{"v6 super-packet: trimmed", []tunnel.Frame{tso(v6s, v6d, 64000, 1378)}, tunnel.SignalTrim, -1, 0, 46},
		{"two segments: one left, no GSO", []tunnel.Frame{small(), tso(v4s, v4d, 2800, 1400)}, tunnel.SignalTrim, -1, 1, 1},
		{"UDP GSO: left out", []tunnel.Frame{small(), uso()}, tunnel.SignalDrop, 1, 0, 0},
		{"plain packets: the largest left out", []tunnel.Frame{small(), frame(tuntest.TCP(v4s, v4d, 900), tunnel.Offload{}), small()}, tunnel.SignalDrop, 1, 0, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var before [][]byte
			var offs []tunnel.Offload
			for i := range tt.batch {
				before = append(before, append([]byte(nil), tt.batch[i].Packet()...))
				offs = append(offs, tt.batch[i].Offload)
			}
			drop, sig := tunnel.Shed(tt.batch)
			if sig != tt.sig || drop != tt.drop {
				t.Fatalf("shed: drop %d, signal %v; want %d, %v", drop, sig, tt.drop, tt.sig)
			}
			for i := range tt.batch {
				f := &tt.batch[i]
				if (sig == tunnel.SignalDrop || i != tt.trimmed) && !bytes.Equal(f.Packet(), before[i]) {
					t.Errorf("frame %d changed", i)
				}
			}
			f := &tt.batch[tt.trimmed]
			switch sig {
			case tunnel.SignalMark:
				if f.Packet()[1]&3 != 3 {
					t.Errorf("TOS %#x: not CE", f.Packet()[1])
				}
			case tunnel.SignalTrim:
				want := tuntest.Segments(t, before[tt.trimmed], offs[tt.trimmed])
				got := tuntest.Segments(t, f.Packet(), f.Offload)
				if len(got) != tt.segsLeft || len(want) != tt.segsLeft+1 {
					t.Fatalf("%d segments after the trim (of %d), want %d", len(got), len(want), tt.segsLeft)
				}
				for i := range got {
					if !bytes.Equal(got[i], want[i]) {
						t.Fatalf("segment %d differs from the original's", i)
					}
				}
				if tt.segsLeft == 1 && f.Offload.GSOType != tunnel.GSONone {
					t.Errorf("one segment left with GSO type %d", f.Offload.GSOType)
				}
			}
		})
	}
}

func frame(p []byte, o tunnel.Offload) tunnel.Frame {
	buf := make([]byte, tunnel.Headroom+len(p))
	copy(buf[tunnel.Headroom:], p)
	return tunnel.Frame{Buf: buf, Off: tunnel.Headroom, Offload: o}
}
