package tuntest

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/tulle-net/tulle/tunnel"
)

// TCP builds an IPv4 or IPv6 TCP packet from src to dst with n payload
// bytes (a pattern), DF set on IPv4. The TCP checksum is left zero: pair it
// with PartialCsum or TSO offload, as the kernel does.
func TCP(src, dst netip.Addr, n int) []byte {
	ip := 20
	if src.Is6() {
		ip = 40
	}
	p := make([]byte, ip+20+n)
	if src.Is4() {
		p[0] = 0x45
		binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
		binary.BigEndian.PutUint16(p[6:], 0x4000) // DF
		p[8], p[9] = 64, 6
		s, d := src.As4(), dst.As4()
		copy(p[12:], s[:])
		copy(p[16:], d[:])
	} else {
		p[0] = 0x60
		binary.BigEndian.PutUint16(p[4:], uint16(20+n))
		p[6], p[7] = 6, 64
		s, d := src.As16(), dst.As16()
		copy(p[8:], s[:])
		copy(p[24:], d[:])
	}
	t := p[ip:]
	binary.BigEndian.PutUint16(t[0:], 40000)
	binary.BigEndian.PutUint16(t[2:], 5201)
	t[12] = 5 << 4
	t[13] = 0x18 // PSH ACK
	for i := range n {
		t[20+i] = byte(i*7 + i>>8)
	}
	return p
}

// IPHeaderLen returns 20 or 40 for the packet's family.
func IPHeaderLen(p []byte) int {
	if p[0]>>4 == 6 {
		return 40
	}
	return 20
}

// PartialCsum is the offload of a single TCP packet whose checksum the
// kernel has left for the device to finish.
func PartialCsum(p []byte) tunnel.Offload {
	return tunnel.Offload{Flags: tunnel.FlagNeedsCsum, CsumStart: uint16(IPHeaderLen(p)), CsumOffset: 16}
}

// TSO is the offload of a TCP super-packet to be cut into mss segments.
func TSO(p []byte, mss int) tunnel.Offload {
	o := PartialCsum(p)
	o.GSOSize = uint16(mss)
	o.GSOType = tunnel.GSOTCPv4
	if p[0]>>4 == 6 {
		o.GSOType = tunnel.GSOTCPv6
	}
	return o
}

// Segments returns the wire packets a kernel makes of pkt with offload o
// (tunnel.Segment): what a receiving TCP stack ends up with, whatever
// super-packets carried them.
func Segments(tb testing.TB, pkt []byte, o tunnel.Offload) [][]byte {
	tb.Helper()
	out := make([]byte, 2*tunnel.BufSize)
	n, seg, err := tunnel.Segment(out, pkt, nil, o)
	if err != nil {
		tb.Fatalf("segment %d-byte packet (%+v): %v", len(pkt), o, err)
	}
	var segs [][]byte
	for b := out[:n]; len(b) > 0; {
		d := b[:min(seg, len(b))]
		segs = append(segs, append([]byte(nil), d...))
		b = b[len(d):]
	}
	return segs
}
