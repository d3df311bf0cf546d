package tunnel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// BatchSize is how many frames one tx iteration reads from the TUN and
// sends.
const BatchSize = 16

// RxBatch is how many frames one rx iteration takes from a receiver and
// writes to the TUN: a whole UDP GRO message of single-packet datagrams
// (VXLAN: up to 64), so the TUN's GRO can merge it into one super-packet.
const RxBatch = 64

// Config configures a Datapath.
type Config struct {
	Device    Device
	Transport Transport
	Peers     *PeerTable
	Counters  *Counters
	// MTU is the largest plain (non-GSO) packet the underlay carries in
	// one datagram: the TUN MTU. Larger DF packets get an ICMP too-big.
	MTU    int
	Logger *slog.Logger
	// Clock is the datapath's time in ns: flow classes, peers' last
	// receive, the AQM (nil: the wall clock; tests freeze it).
	Clock func() int64
	// NoAQM turns off the bulk queues' AQM (aqm.go).
	NoAQM bool
}

// Datapath runs the loops between a Device and a Transport: one tx loop
// per device queue, one rx loop per transport receiver.
type Datapath struct {
	cfg Config
	mtu atomic.Int64
	log *slog.Logger
	// icmp limits ICMP errors (RFC 1812 4.3.2.8, RFC 4443 2.4f), shared
	// by the tx loops.
	icmp *rate.Limiter
	// flows classifies flows sparse or bulk (a multi-queue device only).
	flows *flowTable
}

// NewDatapath returns a datapath; Run starts it.
func NewDatapath(cfg Config) *Datapath {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Counters == nil {
		cfg.Counters = &Counters{}
	}
	if cfg.Clock == nil {
		cfg.Clock = func() int64 { return time.Now().UnixNano() }
	}
	d := &Datapath{
		cfg:  cfg,
		log:  cfg.Logger,
		icmp: rate.NewLimiter(10, 10),
	}
	d.mtu.Store(int64(cfg.MTU))
	return d
}

// SetMTU changes the largest plain packet carried (the underlay MTU
// changed): larger DF packets get ICMP too-big from now on.
func (d *Datapath) SetMTU(mtu int) { d.mtu.Store(int64(mtu)) }

// Run forwards until ctx ends or the device or transport dies. On return
// both are closed: that is how blocked loops are released. Closing the TUN
// leaves the (persistent) interface in place.
func (d *Datapath) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	queues := []Queue{d.cfg.Device}
	if mq, ok := d.cfg.Device.(MultiQueue); ok {
		queues = mq.Queues()
	}
	if len(queues) > 1 {
		d.flows = new(flowTable)
	}
	var wg sync.WaitGroup
	for i, q := range queues {
		wg.Go(func() { cancel(d.txLoop(q, i == 0)) })
	}
	for _, recv := range d.cfg.Transport.Receivers() {
		wg.Go(func() { cancel(d.rxLoop(recv, queues)) })
	}
	<-ctx.Done()
	err := context.Cause(ctx)
	// Unblock the loops: the owner closes device and transport on return.
	d.cfg.Transport.Close()
	d.cfg.Device.Close()
	wg.Wait()
	if errors.Is(err, context.Canceled) || errors.Is(err, os.ErrClosed) {
		return nil
	}
	return err
}

func newFrames(n int) []Frame {
	fs := make([]Frame, n)
	for i := range fs {
		fs[i].Buf = make([]byte, BufSize)
	}
	return fs
}

// txLoop: TUN queue → peer lookup → transport. With several queues, it
// counts each frame to its flow (flows); sparse is the loop of the sparse
// queue.
func (d *Datapath) txLoop(q Queue, sparse bool) error {
	in := newFrames(BatchSize)
	var icmpB []byte // made on the first too-big packet
	out := make([]Frame, 0, BatchSize)
	ctr := d.cfg.Counters
	// Only a multi-queue device has a sparse queue; every other queue
	// is bulk and gets the AQM.
	sparse = sparse && d.flows != nil
	var aqm *codel
	if !sparse && !d.cfg.NoAQM {
		aqm = newCodel(AQMTarget, AQMInterval)
	}
	for {
		for i := range in {
			in[i].Buf = in[i].Buf[:cap(in[i].Buf)]
		}
		if sparse {
			d.flows.sparseIdle.Store(true)
		}
		n, err := q.Read(in)
		if sparse {
			d.flows.sparseIdle.Store(false)
		}
		if err != nil {
			return fmt.Errorf("tx: %w", err)
		}
		var now int64
		if d.flows != nil || aqm != nil {
			now = d.cfg.Clock()
		}
		// A read that returned less than it asked for drained the queue.
		skip := -1
		if aqm != nil && aqm.read(now, n < len(in)) {
			var sig Signal
			skip, sig = shed(in[:n])
			if sig != SignalNone {
				ctr.Add(aqmCounter[sig], 1)
			}
		}
		out = out[:0]
		for i := range in[:n] {
			if i == skip {
				continue
			}
			f := &in[i]
			pkt := f.Packet()
			_, dst, ok := Addrs(pkt)
			if !ok {
				ctr.Add(DropMalformed, 1)
				continue
			}
			peer := d.cfg.Peers.Lookup(dst)
			if peer == nil {
				ctr.Add(DropNoRoute, 1)
				continue
			}
			if f.Offload.GSOType == GSONone && len(pkt) > int(d.mtu.Load()) {
				if icmpB == nil {
					icmpB = make([]byte, BufSize)
				}
				if d.sendTooBig(q, pkt, icmpB) {
					continue
				}
			}
			f.Addr = peer.Addr
			f.Sparse = sparse
			if d.flows != nil {
				d.flows.observe(flowHash(pkt), len(pkt), now)
			}
			ctr.Add(TxBytes, uint64(len(pkt)))
			peer.Stats.TxFrames.Add(1)
			peer.Stats.TxBytes.Add(uint64(len(pkt)))
			out = append(out, *f)
		}
		ctr.TxBatch.observe(n)
		if len(out) == 0 {
			continue
		}
		ctr.Add(TxFrames, uint64(len(out)))
		if sparse {
			ctr.Add(TxSparse, uint64(len(out)))
		}
		prioritize(out)
		if err := d.cfg.Transport.Send(out); err != nil {
			return fmt.Errorf("tx: %w", err)
		}
	}
}

// sendTooBig answers an oversized packet that may not be fragmented and
// reports whether it was dropped. IPv4 packets without DF are carried whole
// (the transport splits them across datagrams). The reply is built in buf
// and written back through q.
func (d *Datapath) sendTooBig(q Queue, pkt, buf []byte) bool {
	var from netip.Addr
	for _, p := range d.cfg.Peers.Local() {
		if p.Addr().Is4() == (pkt[0]>>4 == 4) {
			from = p.Addr()
			break
		}
	}
	n := tooBig(buf[Headroom:], pkt, from, int(d.mtu.Load()))
	if n == 0 {
		if pkt[0]>>4 == 4 && pkt[6]&0x40 == 0 {
			return false // no DF: carry it
		}
		d.cfg.Counters.Add(DropTooBig, 1)
		return true
	}
	d.cfg.Counters.Add(DropTooBig, 1)
	if !d.icmp.Allow() {
		return true
	}
	reply := []Frame{{Buf: buf[:Headroom+n], Off: Headroom}}
	if err := q.Write(reply); err == nil {
		d.cfg.Counters.Add(ICMPTooBigSent, 1)
	}
	return true
}

// rxLoop: transport → checks → TUN. With several queues, each frame is
// written on the queue of its flow, which is the queue the kernel then
// reads the flow's replies from: queue 0 for a sparse flow, one of the
// others by flowHash for a bulk one (flows.go).
func (d *Datapath) rxLoop(recv ReceiveFunc, queues []Queue) error {
	in := make([]Frame, RxBatch)
	outs := make([][]Frame, len(queues))
	for i := range outs {
		outs[i] = make([]Frame, 0, RxBatch)
	}
	ctr := d.cfg.Counters
	peers := d.cfg.Peers
	for {
		n, err := recv(in)
		if err != nil {
			return fmt.Errorf("rx: %w", err)
		}
		for i := range outs {
			outs[i] = outs[i][:0]
		}
		ctr.RxBatch.observe(n)
		now := d.cfg.Clock()
		written := 0
		for i := range in[:n] {
			f := &in[i]
			peer := peers.ByAddr(f.Addr)
			if peer == nil {
				ctr.Add(DropUnknownPeer, 1)
				continue
			}
			src, dst, ok := Addrs(f.Packet())
			if !ok {
				ctr.Add(DropMalformed, 1)
				peer.Stats.Drops.Add(1)
				continue
			}
			if !peer.Owns(src) {
				ctr.Add(DropSpoofed, 1)
				peer.Stats.Drops.Add(1)
				continue
			}
			if !peers.IsLocal(dst) {
				ctr.Add(DropNotLocal, 1)
				peer.Stats.Drops.Add(1)
				continue
			}
			ctr.Add(RxBytes, uint64(len(f.Packet())))
			peer.Stats.rx(len(f.Packet()), now)
			q := 0
			if d.flows != nil {
				h := flowHash(f.Packet())
				if d.flows.sparseQueue(h, now) {
					ctr.Add(RxSparse, 1)
				} else {
					q = 1 + int(h%uint32(len(queues)-1))
				}
				d.flows.observe(h, len(f.Packet()), now)
			}
			outs[q] = append(outs[q], *f)
			written++
		}
		if written == 0 {
			continue
		}
		ctr.Add(RxFrames, uint64(written))
		for i, out := range outs {
			if len(out) == 0 {
				continue
			}
			if err := queues[i].Write(out); err != nil {
				return fmt.Errorf("rx: %w", err)
			}
		}
	}
}
