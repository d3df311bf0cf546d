package tunnel

import (
	"bytes"
	"encoding/binary"

	"github.com/tulle-net/tulle/internal/inet"
)

// tcpACK is the flag every mergeable segment carries.
const tcpACK = 0x10

// Coalescer does what the kernel's GRO does for TCP: consecutive segments
// of one flow, in sequence and with equal headers, are slid together behind
// the first one's headers in its buffer, and the run becomes one TSO
// super-packet for a single TUN write (headers rewritten, checksum left
// partial for the kernel). Segments come either complete (their checksums
// are verified before merging) or with partial checksums and optionally
// GSO already (pieces a Cutter made; their integrity is the underlay's
// checksum's concern), never both in one run. A run ends at a short
// segment, at PSH, or at 64 KB.
//
// A Coalescer holds no memory of its own; the zero value is ready.
type Coalescer struct {
	// Trusted skips the verification of complete checksums: the segments
	// were authenticated end to end (WireGuard's AEAD), as the kernel's
	// WireGuard marks what it decrypts CHECKSUM_UNNECESSARY.
	Trusted bool

	buf      []byte
	off, end int
	ip, hl   int
	mss      int
	seq      uint32
	n        int
	partial  bool
	ended    bool // the run's last segment was short or had PSH
	o        Offload
}

// Start begins a run with the TCP packet buf[off:end] (offload o); later
// segments are appended at buf[end:], up to len(buf). It reports whether
// the packet can head a run: IPv4 without options or fragmentation, or
// IPv6 without extension headers, flags ACK only, some payload, a valid
// checksum or a partial one.
func (c *Coalescer) Start(buf []byte, off, end int, o Offload) bool {
	c.n = 0
	p := buf[off:end]
	ip, hl, ok := segmentHeaders(p)
	if !ok || p[ip+13] != tcpACK {
		return false
	}
	payload := len(p) - hl
	mss, partial, ok := segmentKind(p, ip, payload, o, c.Trusted)
	if !ok || payload%mss != 0 {
		return false
	}
	*c = Coalescer{Trusted: c.Trusted, buf: buf, off: off, end: end, ip: ip, hl: hl, mss: mss, partial: partial, o: o, n: 1,
		seq: binary.BigEndian.Uint32(p[ip+4:]) + uint32(payload)}
	return true
}

// segmentKind returns the segment size a packet implies and whether its
// checksum is partial, or false if it cannot take part in a run.
func segmentKind(p []byte, ip, payload int, o Offload, trusted bool) (mss int, partial, ok bool) {
	switch {
	case o.None():
		return payload, false, trusted || tcpChecksumValid(p, ip)
	case o.Flags != FlagNeedsCsum || int(o.CsumStart) != ip || o.CsumOffset != 16:
		return 0, false, false
	case o.GSOType == GSONone:
		return payload, true, true
	case (o.GSOType == GSOTCPv4) == (ip == 20) && (o.GSOType == GSOTCPv4 || o.GSOType == GSOTCPv6) && o.GSOSize > 0:
		return int(o.GSOSize), true, true
	}
	return 0, false, false
}

// Add appends q's payload to the run if q continues it: same flow and
// headers, the next sequence number, the same kind of checksum, segments
// no larger than the run's, room left. It reports whether q was taken; if
// not, nothing changed and q is the caller's to handle.
func (c *Coalescer) Add(q []byte, qo Offload) bool {
	if c.n == 0 || c.ended || len(q) <= c.hl {
		return false
	}
	payload := len(q) - c.hl
	if c.end-c.off+payload > 65535 || c.end+payload > len(c.buf) {
		return false
	}
	p := c.buf[c.off:c.end]
	if !sameFlow(p, q, c.hl) || binary.BigEndian.Uint32(q[c.ip+4:]) != c.seq {
		return false
	}
	flags := q[c.ip+13]
	if flags != tcpACK && flags != tcpACK|tcpPSH {
		return false
	}
	mss, partial, ok := segmentKind(q, c.ip, payload, qo, c.Trusted)
	if !ok || partial != c.partial || mss > c.mss || (mss < c.mss && payload > mss) {
		return false
	}
	c.end += copy(c.buf[c.end:], q[c.hl:])
	c.seq += uint32(payload)
	c.n++
	if flags&tcpPSH != 0 {
		c.buf[c.off+c.ip+13] |= tcpPSH
		c.ended = true
	}
	if payload%c.mss != 0 {
		c.ended = true
	}
	return true
}

// Finish rewrites the merged packet's headers and returns where it ends in
// the buffer, its offload and how many packets went into it. A run of one
// packet is left as it came.
func (c *Coalescer) Finish() (end int, o Offload, merged int) {
	if c.n <= 1 {
		return c.end, c.o, c.n
	}
	p := c.buf[c.off:c.end]
	gso := uint8(GSOTCPv4)
	var src, dst []byte
	if c.ip == 20 {
		binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
		p[10], p[11] = 0, 0
		binary.BigEndian.PutUint16(p[10:], inet.Checksum(p[:20], 0))
		src, dst = p[12:16], p[16:20]
	} else {
		gso = GSOTCPv6
		binary.BigEndian.PutUint16(p[4:], uint16(len(p)-40))
		src, dst = p[8:24], p[24:40]
	}
	// Partial checksum, as the kernel leaves it for a device: the
	// pseudo-header sum, folded.
	binary.BigEndian.PutUint16(p[c.ip+16:], inet.Fold(inet.PseudoHeader(src, dst, 6, len(p)-c.ip)))
	o = Offload{Flags: FlagNeedsCsum, GSOType: gso, GSOSize: uint16(c.mss), CsumStart: uint16(c.ip), CsumOffset: 16}
	n := c.n
	c.n = 0
	return c.end, o, n
}

// segmentHeaders returns the IP header length and the IP + TCP header
// length of a TCP segment that can take part in a merge: IPv4 without
// options or fragmentation, or IPv6 without extension headers; some
// payload.
func segmentHeaders(p []byte) (ip, hl int, ok bool) {
	switch {
	case len(p) >= 40 && p[0] == 0x45 && p[9] == 6 && binary.BigEndian.Uint16(p[6:])&0x3fff == 0:
		ip = 20
	case len(p) >= 60 && p[0]>>4 == 6 && p[6] == 6:
		ip = 40
	default:
		return 0, 0, false
	}
	th := int(p[ip+12]>>4) * 4
	if th < 20 || len(p) <= ip+th {
		return 0, 0, false
	}
	return ip, ip + th, true
}

// sameFlow reports whether q continues p's flow with the same headers:
// IP fields but length, ID and checksum; TCP fields but sequence number,
// flags and checksum (options included).
func sameFlow(p, q []byte, hl int) bool {
	if len(q) < hl {
		return false
	}
	var ip int
	if p[0]>>4 == 4 {
		ip = 20
		if q[0] != p[0] || q[1] != p[1] || !bytes.Equal(q[6:10], p[6:10]) || !bytes.Equal(q[12:20], p[12:20]) {
			return false
		}
	} else {
		ip = 40
		if !bytes.Equal(q[:4], p[:4]) || !bytes.Equal(q[6:40], p[6:40]) {
			return false
		}
	}
	return q[ip+12] == p[ip+12] && bytes.Equal(q[ip:ip+4], p[ip:ip+4]) && bytes.Equal(q[ip+8:ip+12], p[ip+8:ip+12]) &&
		bytes.Equal(q[ip+14:ip+16], p[ip+14:ip+16]) && bytes.Equal(q[ip+18:hl], p[ip+18:hl])
}

// tcpChecksumValid checks the checksum of a TCP segment whose IP header
// is ip bytes long.
func tcpChecksumValid(p []byte, ip int) bool {
	var src, dst []byte
	if ip == 20 {
		src, dst = p[12:16], p[16:20]
	} else {
		src, dst = p[8:24], p[24:40]
	}
	return inet.Checksum(p[ip:], inet.PseudoHeader(src, dst, 6, len(p)-ip)) == 0
}
