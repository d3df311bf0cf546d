package udpsock

import "net"

// Batch lays out datagrams for several peers in one buffer and sends them
// with as few messages as the kernel allows: a train of equal-size
// datagrams is one UDP GSO message, and single datagrams to the same peer
// with the same size join into one too (so a burst of small packets to one
// peer leaves in one send instead of one message each). Used by one
// goroutine.
type Batch struct {
	slab []byte
	used int
	runs []run
	w    Writer
}

// run is a stretch of the slab to one peer: datagrams of seg bytes, the
// last possibly shorter.
type run struct {
	s      *Socket
	addr   *net.UDPAddr
	buf    []byte
	seg    int
	closed bool // a shorter last datagram, or a train: nothing may join
}

// NewBatch returns a Batch with a layout buffer of size bytes.
func NewBatch(size int) *Batch { return &Batch{slab: make([]byte, size)} }

// Room is the free part of the layout buffer: lay datagrams out at its
// start, then Commit them. Flush first when it is too small.
func (b *Batch) Room() []byte { return b.slab[b.used:] }

// Empty reports whether nothing is queued.
func (b *Batch) Empty() bool { return len(b.runs) == 0 }

// Commit queues the n bytes laid out at the start of Room as datagrams of
// seg bytes (the last may be shorter) to addr on s. A single datagram
// (n <= seg) joins the previous run when that run goes to the same peer on
// the same socket with datagrams at least as large, and is still open.
func (b *Batch) Commit(s *Socket, addr *net.UDPAddr, n, seg int) {
	start := b.used
	b.used += n
	buf := b.slab[start:b.used]
	if n <= seg {
		if k := len(b.runs); k > 0 {
			p := &b.runs[k-1]
			if p.s == s && p.addr == addr && !p.closed && n <= p.seg &&
				len(p.buf)/p.seg < MaxGSOSegments && len(p.buf)+n <= MaxGSOBytes && len(p.buf) > 0 && &p.buf[len(p.buf)-1] == &b.slab[start-1] {
				p.buf = p.buf[:len(p.buf)+n]
				p.closed = n < p.seg
				return
			}
		}
		b.runs = append(b.runs, run{s: s, addr: addr, buf: buf, seg: n})
		return
	}
	b.runs = append(b.runs, run{s: s, addr: addr, buf: buf, seg: seg, closed: true})
}

// Flush sends everything queued, one sendmmsg run per socket, and reports
// each socket's Result to done. Only a closed socket is an error.
func (b *Batch) Flush(done func(*Socket, Result)) error {
	defer func() {
		b.runs = b.runs[:0]
		b.used = 0
	}()
	for i := 0; i < len(b.runs); {
		s := b.runs[i].s
		for ; i < len(b.runs) && b.runs[i].s == s; i++ {
			r := b.runs[i]
			b.w.Add(s, r.addr, r.buf, r.seg)
		}
		res, err := b.w.Flush(s)
		done(s, res)
		if err != nil {
			return err
		}
	}
	return nil
}

// Queued returns copies of the datagrams queued, in order, and discards
// them: what a Flush would have put on the wire (for tests).
func (b *Batch) Queued() [][]byte {
	var out [][]byte
	for _, r := range b.runs {
		for buf := r.buf; len(buf) > 0; {
			n := min(len(buf), r.seg)
			out = append(out, append([]byte(nil), buf[:n]...))
			buf = buf[n:]
		}
	}
	b.runs, b.used = b.runs[:0], 0
	return out
}
