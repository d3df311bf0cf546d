package tunnel_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"

	"github.com/tulle-net/tulle/internal/inet"
	"github.com/tulle-net/tulle/tunnel"
	"github.com/tulle-net/tulle/tunnel/tuntest"
)

// l4Valid checks a packet's IPv4 header checksum and its TCP/UDP checksum.
func l4Valid(t *testing.T, p []byte) {
	t.Helper()
	ip := tuntest.IPHeaderLen(p)
	var src, dst []byte
	var proto uint8
	if p[0]>>4 == 4 {
		if inet.Checksum(p[:20], 0) != 0 {
			t.Errorf("IPv4 header checksum invalid")
		}
		if int(binary.BigEndian.Uint16(p[2:])) != len(p) {
			t.Errorf("IPv4 total length %d, packet %d", binary.BigEndian.Uint16(p[2:]), len(p))
		}
		src, dst, proto = p[12:16], p[16:20], p[9]
	} else {
		if int(binary.BigEndian.Uint16(p[4:]))+40 != len(p) {
			t.Errorf("IPv6 payload length %d, packet %d", binary.BigEndian.Uint16(p[4:]), len(p))
		}
		src, dst, proto = p[8:24], p[24:40], p[6]
	}
	if inet.Checksum(p[ip:], inet.PseudoHeader(src, dst, proto, len(p)-ip)) != 0 {
		t.Errorf("L4 checksum invalid")
	}
}

func TestSegment(t *testing.T) {
	v4s, v4d := netip.MustParseAddr("100.64.1.2"), netip.MustParseAddr("100.64.2.3")
	v6s, v6d := netip.MustParseAddr("fd00:1::2"), netip.MustParseAddr("fd00:2::3")
	prefix := []byte{0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4}
	for _, tt := range []struct {
		name    string
		src     netip.Addr
		dst     netip.Addr
		payload int
		mss     int
		ecn     bool
	}{
		{"v4 even", v4s, v4d, 1400 * 10, 1400, false},
		{"v4 short tail", v4s, v4d, 60000, 1398, false},
		{"v4 ecn", v4s, v4d, 5000, 1000, true},
		{"v6", v6s, v6d, 64000, 1378, false},
		{"one segment", v4s, v4d, 500, 1400, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			pkt := tuntest.TCP(tt.src, tt.dst, tt.payload)
			ip := tuntest.IPHeaderLen(pkt)
			pkt[ip+13] = 0x19 | tcpCWRIf(tt.ecn)               // FIN PSH ACK (+CWR)
			binary.BigEndian.PutUint32(pkt[ip+4:], 0xfffff000) // sequence numbers wrap
			o := tuntest.TSO(pkt, tt.mss)
			if tt.ecn {
				o.GSOType |= tunnel.GSOECN
			}
			out := make([]byte, 80000)
			n, seg, err := tunnel.Segment(out, pkt, prefix, o)
			if err != nil {
				t.Fatal(err)
			}
			want := (tt.payload + tt.mss - 1) / tt.mss
			var got []byte
			var i int
			for b := out[:n]; len(b) > 0; i++ {
				d := b[:min(seg, len(b))]
				b = b[len(d):]
				if i < want-1 && len(d) != seg {
					t.Fatalf("datagram %d is %d bytes, want %d", i, len(d), seg)
				}
				if !bytes.Equal(d[:len(prefix)], prefix) {
					t.Fatalf("datagram %d: prefix not copied", i)
				}
				s := d[len(prefix):]
				l4Valid(t, s)
				if got, want := binary.BigEndian.Uint32(s[ip+4:]), 0xfffff000+uint32(i*tt.mss); got != want {
					t.Errorf("segment %d seq %#x, want %#x", i, got, want)
				}
				flags := s[ip+13]
				last := len(b) == 0
				if (flags&0x09 != 0) != last {
					t.Errorf("segment %d flags %#x: FIN/PSH must be on the last only", i, flags)
				}
				if tt.ecn && (flags&0x80 != 0) != (i == 0) {
					t.Errorf("segment %d flags %#x: CWR must be on the first only", i, flags)
				}
				if ip == 20 && binary.BigEndian.Uint16(s[4:]) != uint16(i) {
					t.Errorf("segment %d IP ID %d", i, binary.BigEndian.Uint16(s[4:]))
				}
				got = append(got, s[ip+20:]...)
			}
			if i != want {
				t.Errorf("%d segments, want %d", i, want)
			}
			if !bytes.Equal(got, pkt[ip+20:]) {
				t.Error("payloads do not add up to the super-packet's")
			}
		})
	}
}

func tcpCWRIf(b bool) byte {
	if b {
		return 0x80
	}
	return 0
}

func TestSegmentPlainFinishesChecksum(t *testing.T) {
	for _, src := range []netip.Addr{netip.MustParseAddr("100.64.1.2"), netip.MustParseAddr("fd00:1::2")} {
		dst := src.Next()
		pkt := tuntest.TCP(src, dst, 300)
		ip := tuntest.IPHeaderLen(pkt)
		if ip == 20 {
			binary.BigEndian.PutUint16(pkt[10:], inet.Checksum(pkt[:20], 0))
		}
		// The kernel leaves the pseudo-header sum in the field.
		s, d := src.AsSlice(), dst.AsSlice()
		binary.BigEndian.PutUint16(pkt[ip+16:], inet.Fold(inet.PseudoHeader(s, d, 6, len(pkt)-ip)))
		out := make([]byte, 2000)
		n, seg, err := tunnel.Segment(out, pkt, nil, tuntest.PartialCsum(pkt))
		if err != nil || n != len(pkt) || seg != n {
			t.Fatalf("%v: n=%d seg=%d err=%v", src, n, seg, err)
		}
		l4Valid(t, out[:n])
	}
}

func TestSegmentRejects(t *testing.T) {
	pkt := tuntest.TCP(netip.MustParseAddr("100.64.1.2"), netip.MustParseAddr("100.64.2.3"), 30000)
	o := tuntest.TSO(pkt, 1400)
	if _, _, err := tunnel.Segment(make([]byte, 1000), pkt, nil, o); !errors.Is(err, tunnel.ErrNoRoom) {
		t.Errorf("small buffer: %v, want ErrNoRoom", err)
	}
	bad := o
	bad.GSOType = tunnel.GSOTCPv6
	if _, _, err := tunnel.Segment(make([]byte, 40000), pkt, nil, bad); !errors.Is(err, tunnel.ErrBadOffload) {
		t.Errorf("v6 GSO on a v4 packet: %v, want ErrBadOffload", err)
	}
}

func BenchmarkSegment(b *testing.B) {
	pkt := tuntest.TCP(netip.MustParseAddr("100.64.1.2"), netip.MustParseAddr("100.64.2.3"), 64000)
	o := tuntest.TSO(pkt, 1398)
	out := make([]byte, 80000)
	prefix := make([]byte, 22)
	b.SetBytes(int64(len(pkt)))
	for b.Loop() {
		if _, _, err := tunnel.Segment(out, pkt, prefix, o); err != nil {
			b.Fatal(err)
		}
	}
}

func TestFinishUnfinished(t *testing.T) {
	src, dst := netip.MustParseAddr("100.64.1.2"), netip.MustParseAddr("100.64.2.3")
	partial := func(src, dst netip.Addr) []byte {
		p := tuntest.TCP(src, dst, 300)
		ip := tuntest.IPHeaderLen(p)
		binary.BigEndian.PutUint16(p[ip+16:], inet.Fold(inet.PseudoHeader(src.AsSlice(), dst.AsSlice(), 6, len(p)-ip)))
		if ip == 20 {
			binary.BigEndian.PutUint16(p[10:], inet.Checksum(p[:20], 0))
		}
		return p
	}
	for _, s := range []netip.Addr{src, netip.MustParseAddr("fd00:1::2")} {
		d := dst
		if s.Is6() {
			d = netip.MustParseAddr("fd00:2::3")
		}
		p := partial(s, d)
		if !tunnel.FinishUnfinished(p) {
			t.Fatalf("%v: an unfinished checksum was not finished", s)
		}
		l4Valid(t, p)
		// Finished, it is left alone; so is a corrupted complete one.
		if tunnel.FinishUnfinished(p) {
			t.Errorf("%v: a complete checksum was recomputed", s)
		}
		p[len(p)-1] ^= 0xff
		if tunnel.FinishUnfinished(p) {
			t.Errorf("%v: a corrupted packet's checksum was made valid", s)
		}
	}
	p := partial(src, dst)
	binary.BigEndian.PutUint16(p[6:], 0x2000) // more fragments
	if tunnel.FinishUnfinished(p) {
		t.Error("a fragment was touched")
	}
}
