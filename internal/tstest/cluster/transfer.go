package cluster

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync/atomic"
	"time"
)

// pattern is a deterministic byte stream, so the far end's checksum is
// compared with one computed independently at the sender.
type pattern struct{ n uint64 }

func (p *pattern) Read(b []byte) (int, error) {
	for i := range b {
		b[i] = byte(p.n*2654435761>>13) ^ byte(p.n)
		p.n++
	}
	return len(b), nil
}

// TransferResult is what a Transfer measured.
type TransferResult struct {
	Bytes    int64
	Sent     [32]byte // SHA-256 of what was sent
	Received [32]byte // SHA-256 of what arrived
	Duration time.Duration
}

// Intact reports whether everything arrived unchanged.
func (r TransferResult) Intact() bool { return r.Sent == r.Received }

// Gbps is the transfer's goodput.
func (r TransferResult) Gbps() float64 {
	return float64(r.Bytes) * 8 / r.Duration.Seconds() / 1e9
}

// Transfer sends size bytes over one TCP connection from node from to dst
// (an address inside node to) and checksums both ends. With pace > 0 the
// send is spread over at least that long, so a restart can land inside it.
func Transfer(ctx context.Context, from, to *Node, dst netip.Addr, size int64, pace time.Duration) (TransferResult, error) {
	return StartTransfer(ctx, from, to, dst, size, pace).Wait()
}

// RunningTransfer is a Transfer under way.
type RunningTransfer struct {
	received atomic.Int64
	done     chan struct{}
	res      TransferResult
	err      error
}

// StartTransfer starts a Transfer in the background.
func StartTransfer(ctx context.Context, from, to *Node, dst netip.Addr, size int64, pace time.Duration) *RunningTransfer {
	rt := &RunningTransfer{done: make(chan struct{})}
	go func() {
		defer close(rt.done)
		rt.res, rt.err = transfer(ctx, from, to, dst, size, pace, &rt.received)
	}()
	return rt
}

// Received returns how many bytes have arrived so far.
func (rt *RunningTransfer) Received() int64 { return rt.received.Load() }

// Done is closed when the transfer ended.
func (rt *RunningTransfer) Done() <-chan struct{} { return rt.done }

// Wait waits for the transfer's end and returns its result.
func (rt *RunningTransfer) Wait() (TransferResult, error) {
	<-rt.done
	return rt.res, rt.err
}

// WaitReceived waits until at least n bytes arrived (the transfer is in
// flight), the transfer ended, or ctx ended.
func (rt *RunningTransfer) WaitReceived(ctx context.Context, n int64) error {
	for rt.Received() < n {
		select {
		case <-rt.done:
			return fmt.Errorf("transfer ended after %d bytes (%v) before %d arrived", rt.Received(), rt.err, n)
		case <-ctx.Done():
			return fmt.Errorf("%d bytes arrived, waiting for %d: %w", rt.Received(), n, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	return nil
}

// counting is a writer that counts bytes into an atomic.
type counting struct{ n *atomic.Int64 }

func (c counting) Write(b []byte) (int, error) { c.n.Add(int64(len(b))); return len(b), nil }

func transfer(ctx context.Context, from, to *Node, dst netip.Addr, size int64, pace time.Duration, received *atomic.Int64) (TransferResult, error) {
	res := TransferResult{Bytes: size}
	ln, err := to.Listen(net.JoinHostPort(dst.String(), "0"))
	if err != nil {
		return res, err
	}
	defer ln.Close()
	type recv struct {
		sum [32]byte
		n   int64
		err error
	}
	got := make(chan recv, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- recv{err: err}
			return
		}
		defer c.Close()
		stop := context.AfterFunc(ctx, func() { c.Close() })
		defer stop()
		h := sha256.New()
		n, err := io.Copy(io.MultiWriter(h, counting{received}), c)
		var r recv
		copy(r.sum[:], h.Sum(nil))
		r.n, r.err = n, err
		got <- r
	}()
	c, err := from.Dial(ctx, ln.Addr().String())
	if err != nil {
		return res, err
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	h := sha256.New()
	src := io.TeeReader(io.LimitReader(&pattern{}, size), h)
	start := time.Now()
	const chunk = 1 << 20
	for written := int64(0); written < size; {
		n, err := io.CopyN(c, src, min(chunk, size-written))
		written += n
		if err != nil {
			return res, fmt.Errorf("send after %d bytes: %w", written, err)
		}
		if pace > 0 {
			if due := time.Duration(float64(pace) * float64(written) / float64(size)); time.Since(start) < due {
				time.Sleep(due - time.Since(start))
			}
		}
	}
	c.(*net.TCPConn).CloseWrite()
	r := <-got
	res.Duration = time.Since(start)
	copy(res.Sent[:], h.Sum(nil))
	res.Received = r.sum
	if r.err != nil {
		return res, fmt.Errorf("receive: %w", r.err)
	}
	if r.n != size {
		return res, fmt.Errorf("received %d bytes, want %d", r.n, size)
	}
	return res, nil
}
