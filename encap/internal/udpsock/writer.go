package udpsock

import (
	"errors"
	"net"

	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"
)

// Writer collects messages for one socket and sends them with sendmmsg. A
// message is one datagram, or a run of equal-size datagrams (the last may
// be shorter) sent as one UDP GSO message. Used by one goroutine.
type Writer struct {
	msgs []ipv4.Message
	segs []int // UDP_SEGMENT size of msgs[i], 0 for none
	iovs [][1][]byte
	oobs [][]byte
}

// Result is what a Flush did.
type Result struct {
	Datagrams int  // datagrams the kernel took
	Dropped   int  // messages it refused (each counted once)
	FellBack  bool // UDP GSO failed with EIO and is now off for the socket
}

// Add queues buf to addr: a run of seg-size datagrams when seg > 0 (cut
// into as many GSO messages as the kernel's limits need, or into single
// datagrams when the socket's GSO is off).
func (w *Writer) Add(s *Socket, addr *net.UDPAddr, buf []byte, seg int) {
	if seg <= 0 || len(buf) <= seg {
		w.add(addr, buf, 0)
		return
	}
	per := 1
	if s.GSO() {
		per = min(MaxGSOSegments, MaxGSOBytes/seg)
	}
	for len(buf) > 0 {
		n := min(len(buf), per*seg)
		w.add(addr, buf[:n], seg)
		buf = buf[n:]
	}
}

func (w *Writer) add(addr *net.UDPAddr, buf []byte, seg int) {
	i := len(w.msgs)
	if i == len(w.iovs) {
		w.iovs = append(w.iovs, [1][]byte{})
		w.oobs = append(w.oobs, make([]byte, unix.CmsgSpace(2)))
	}
	w.iovs[i][0] = buf
	m := ipv4.Message{Buffers: w.iovs[i][:], Addr: addr}
	if seg > 0 && len(buf) > seg {
		m.OOB = putSegmentCmsg(w.oobs[i], uint16(seg))
	} else {
		seg = 0
	}
	w.msgs = append(w.msgs, m)
	w.segs = append(w.segs, seg)
}

// Flush sends everything queued on s. A GSO send that fails with EIO (the
// egress device cannot checksum-offload) turns GSO off for the socket and
// resends the rest as plain datagrams; other per-message errors drop that
// message. Only a closed socket is an error.
func (w *Writer) Flush(s *Socket) (Result, error) {
	var r Result
	defer func() { w.msgs, w.segs = w.msgs[:0], w.segs[:0] }()
	for i := 0; i < len(w.msgs); {
		n, err := s.BC.WriteBatch(w.msgs[i:], 0)
		for j := i; j < i+n; j++ {
			r.Datagrams += datagrams(len(w.msgs[j].Buffers[0]), w.segs[j])
		}
		i += n
		if err == nil {
			continue
		}
		if errors.Is(err, net.ErrClosed) {
			return r, err
		}
		if i >= len(w.msgs) {
			break
		}
		if errors.Is(err, unix.EIO) && w.segs[i] > 0 && !s.gsoOff.Swap(true) {
			r.FellBack = true
		}
		if !s.GSO() && w.segs[i] > 0 {
			w.splitFrom(i)
			continue
		}
		r.Dropped++
		i++
	}
	return r, nil
}

// splitFrom rewrites the GSO messages from index i on into single datagrams.
func (w *Writer) splitFrom(i int) {
	type rest struct {
		addr *net.UDPAddr
		buf  []byte
		seg  int
	}
	var tail []rest
	for j := i; j < len(w.msgs); j++ {
		tail = append(tail, rest{w.msgs[j].Addr.(*net.UDPAddr), w.msgs[j].Buffers[0], w.segs[j]})
	}
	w.msgs, w.segs = w.msgs[:i], w.segs[:i]
	for _, r := range tail {
		if r.seg == 0 {
			w.add(r.addr, r.buf, 0)
			continue
		}
		for b := r.buf; len(b) > 0; {
			n := min(len(b), r.seg)
			w.add(r.addr, b[:n], 0)
			b = b[n:]
		}
	}
}

func datagrams(n, seg int) int {
	if seg == 0 {
		return 1
	}
	return (n + seg - 1) / seg
}
