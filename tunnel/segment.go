package tunnel

import (
	"encoding/binary"
	"errors"

	"github.com/tulle-net/tulle/internal/inet"
)

// ErrNoRoom is returned by Segment when the output buffer is too small.
var ErrNoRoom = errors.New("segment: output buffer too small")

// TCP flags Segment adjusts.
const (
	tcpFIN = 0x01
	tcpPSH = 0x08
	tcpCWR = 0x80
)

// Segment does in software what a NIC does with a TSO/USO super-packet: it
// cuts pkt (with offload o) into wire packets with complete headers and
// checksums, as the kernel's own GSO would (IPv4 ID incremented per
// segment, TCP sequence numbers advanced, FIN and PSH on the last segment
// only, CWR on the first only). Each packet is written to out preceded by a
// copy of prefix (an encapsulation header). A packet without segmentation
// has its partial checksum, if any, finished. It returns the bytes written
// and the size of every datagram but the last (prefix + packet), which is
// the shape one UDP GSO send takes.
func Segment(out, pkt, prefix []byte, o Offload) (n, seg int, err error) {
	hdrLen, err := ValidateOffload(pkt, o)
	if err != nil {
		return 0, 0, err
	}
	if o.GSOType == GSONone {
		if len(prefix)+len(pkt) > len(out) {
			return 0, 0, ErrNoRoom
		}
		n = copy(out, prefix)
		p := out[n : n+len(pkt)]
		copy(p, pkt)
		if o.Flags&FlagNeedsCsum != 0 {
			finishCsum(p, int(o.CsumStart), int(o.CsumOffset))
		}
		return n + len(pkt), n + len(pkt), nil
	}
	c := newCut(pkt, o, int(hdrLen))
	if c.count*(len(prefix)+c.hl)+len(c.payload) > len(out) {
		return 0, 0, ErrNoRoom
	}
	for i := range c.count {
		n += copy(out[n:], prefix)
		l := c.piece(out[n:], i, 1, false)
		n += l
		if i == 0 {
			seg = len(prefix) + l
		}
	}
	return n, seg, nil
}

// Cutter cuts a TSO/USO super-packet into smaller ones of whole segments,
// each small enough for one datagram: a receiver can hand every piece that
// arrives to its kernel, so a lost datagram costs only its own segments
// rather than the whole super-packet. Pieces keep the offload's partial
// checksum (the field holds the pseudo-header sum for the piece's length)
// and GSO type; a piece of one segment carries no GSO. Headers are
// rewritten per piece as Segment does per segment.
type Cutter struct {
	c    cut
	per  int // segments per piece
	next int // index of the next piece's first segment
}

// NewCutter prepares to cut pkt (offload o, which must be TCP or UDP GSO)
// into pieces of at most maxLen bytes. It fails with ErrBadOffload for an
// invalid offload or one without segmentation, and ErrNoRoom when not even
// one segment fits in maxLen.
func NewCutter(pkt []byte, o Offload, maxLen int) (Cutter, error) {
	hdrLen, err := ValidateOffload(pkt, o)
	if err != nil {
		return Cutter{}, err
	}
	if o.GSOType == GSONone {
		return Cutter{}, ErrBadOffload
	}
	c := newCut(pkt, o, int(hdrLen))
	per := (maxLen - c.hl) / c.mss
	if per < 1 {
		return Cutter{}, ErrNoRoom
	}
	return Cutter{c: c, per: per}, nil
}

// PieceLen is the length of every piece but the last.
func (k *Cutter) PieceLen() int {
	return k.c.hl + min(k.per*k.c.mss, len(k.c.payload))
}

// Next writes the next piece into out and returns its length and offload;
// ok is false when every piece was written. out must hold PieceLen bytes.
func (k *Cutter) Next(out []byte) (n int, o Offload, ok bool) {
	if k.next >= k.c.count {
		return 0, Offload{}, false
	}
	segs := min(k.per, k.c.count-k.next)
	n = k.c.piece(out, k.next, segs, true)
	k.next += segs
	o = k.c.o
	if segs == 1 {
		o.GSOType, o.GSOSize = GSONone, 0
	}
	return n, o, true
}

// cut is a validated GSO super-packet being cut into pieces.
type cut struct {
	pkt      []byte
	o        Offload
	payload  []byte
	hl, ip   int // IP + transport header length; IP header length
	mss      int
	count    int // segments
	v4, tcp  bool
	src, dst []byte
	proto    uint8
	id       uint16
	seq      uint32
}

func newCut(pkt []byte, o Offload, hl int) cut {
	c := cut{pkt: pkt, o: o, hl: hl, ip: int(o.CsumStart), mss: int(o.GSOSize), payload: pkt[hl:]}
	c.count = (len(c.payload) + c.mss - 1) / c.mss
	if c.count == 0 {
		c.count = 1 // a header-only super-packet goes out as is
	}
	c.v4 = pkt[0]>>4 == 4
	c.tcp = o.GSOType&^GSOECN != GSOUDPL4
	c.proto = 17
	if c.tcp {
		c.proto = 6
		c.seq = binary.BigEndian.Uint32(pkt[c.ip+4:])
	}
	if c.v4 {
		c.src, c.dst = pkt[12:16], pkt[16:20]
		c.id = binary.BigEndian.Uint16(pkt[4:])
	} else {
		c.src, c.dst = pkt[8:24], pkt[24:40]
	}
	return c
}

// piece writes segments [i, i+segs) into out as one packet: headers copied
// and rewritten (IP length, ID and checksum; TCP sequence number and flags,
// or UDP length) and the transport checksum complete, or left partial. It
// returns the packet's length.
func (c *cut) piece(out []byte, i, segs int, partial bool) int {
	chunk := c.payload[min(i*c.mss, len(c.payload)):min((i+segs)*c.mss, len(c.payload))]
	s := out[:c.hl+len(chunk)]
	copy(s, c.pkt[:c.hl])
	copy(s[c.hl:], chunk)
	if c.v4 {
		binary.BigEndian.PutUint16(s[2:], uint16(len(s)))
		binary.BigEndian.PutUint16(s[4:], c.id+uint16(i))
		s[10], s[11] = 0, 0
		binary.BigEndian.PutUint16(s[10:], inet.Checksum(s[:c.ip], 0))
	} else {
		binary.BigEndian.PutUint16(s[4:], uint16(len(s)-40))
	}
	l4 := s[c.ip:]
	if c.tcp {
		binary.BigEndian.PutUint32(l4[4:], c.seq+uint32(i*c.mss))
		if i+segs < c.count {
			l4[13] &^= tcpFIN | tcpPSH
		}
		if i > 0 {
			l4[13] &^= tcpCWR
		}
	} else {
		binary.BigEndian.PutUint16(l4[4:], uint16(len(l4)))
	}
	at := c.ip + int(c.o.CsumOffset)
	ph := inet.PseudoHeader(c.src, c.dst, c.proto, len(l4))
	var sum uint16
	if partial {
		sum = inet.Fold(ph)
	} else {
		s[at], s[at+1] = 0, 0
		sum = inet.Checksum(l4, ph)
		if !c.tcp && sum == 0 {
			sum = 0xffff
		}
	}
	binary.BigEndian.PutUint16(s[at:], sum)
	return len(s)
}

// finishCsum completes a partial checksum: the field holds the
// pseudo-header sum, the device adds the rest.
func finishCsum(p []byte, start, off int) {
	at := start + off
	initial := uint64(binary.BigEndian.Uint16(p[at:]))
	p[at], p[at+1] = 0, 0
	c := inet.Checksum(p[start:], initial)
	if c == 0 && p[protoOffset(int(p[0]>>4))] == 17 {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(p[at:], c)
}

// FinishUnfinished completes the TCP or UDP checksum of a packet whose
// sender left it for a device to finish and no device did: the field
// still holds the pseudo-header sum. Linux hands such packets on where no
// wire is crossed (a veth, a virtio-net link between two VMs on one host),
// and a kernel VXLAN device there encapsulates them unfinished; a kernel
// receiver trusts them, a userspace receiver must finish them. A complete
// packet whose checksum happens to equal its pseudo-header sum is left as
// it was (finishing it computes the same value). It reports whether pkt
// was changed.
func FinishUnfinished(pkt []byte) bool {
	v, ip, ok := ipHeaderLen(pkt)
	if !ok {
		return false
	}
	var src, dst []byte
	var proto uint8
	if v == 4 {
		if binary.BigEndian.Uint16(pkt[6:])&0x3fff != 0 {
			return false // a fragment: no whole L4 header to check
		}
		src, dst, proto = pkt[12:16], pkt[16:20], pkt[9]
	} else {
		src, dst, proto = pkt[8:24], pkt[24:40], pkt[6]
	}
	off := 16
	switch {
	case proto == 17:
		off = 6
	case proto != 6:
		return false
	}
	if len(pkt) < ip+off+2 {
		return false
	}
	field := binary.BigEndian.Uint16(pkt[ip+off:])
	if field == 0 || field != inet.Fold(inet.PseudoHeader(src, dst, proto, len(pkt)-ip)) {
		return false
	}
	finishCsum(pkt, ip, off)
	return true
}

// Segments walks a packet as the wire packets it stands for: a TSO/USO
// super-packet segment by segment, each with complete headers and
// checksums (as Segment writes them), or a plain packet as itself with a
// partial checksum finished. Transports that carry one packet per
// datagram (WireGuard) write each straight into their send buffer.
type Segments struct {
	c    cut
	pkt  []byte
	o    Offload
	next int
	one  bool // a plain packet
}

// NewSegments validates o against pkt and prepares the walk.
func NewSegments(pkt []byte, o Offload) (Segments, error) {
	hdrLen, err := ValidateOffload(pkt, o)
	if err != nil {
		return Segments{}, err
	}
	if o.GSOType == GSONone {
		return Segments{pkt: pkt, o: o, one: true}, nil
	}
	return Segments{c: newCut(pkt, o, int(hdrLen))}, nil
}

// MaxLen is the length of the longest segment (every one but the last).
func (s *Segments) MaxLen() int {
	if s.one {
		return len(s.pkt)
	}
	return s.c.hl + min(s.c.mss, len(s.c.payload))
}

// Next writes the next segment into out (which must hold MaxLen bytes)
// and returns its length; ok is false when every segment was written.
func (s *Segments) Next(out []byte) (n int, ok bool) {
	if s.one {
		if s.next > 0 {
			return 0, false
		}
		s.next = 1
		n = copy(out, s.pkt)
		if s.o.Flags&FlagNeedsCsum != 0 {
			finishCsum(out[:n], int(s.o.CsumStart), int(s.o.CsumOffset))
		}
		return n, true
	}
	if s.next >= s.c.count {
		return 0, false
	}
	n = s.c.piece(out, s.next, 1, false)
	s.next++
	return n, true
}
