package tunnel

import (
	"errors"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// ErrDetached is returned by TUN reads and writes once the interface was
// deleted under the open fd (ip link del): the fd is dead for good, and a
// new device must be opened.
var ErrDetached = errors.New("tun interface deleted")

// ReopeningTUN is a TUN device that survives the deletion of its
// interface: when the kernel detaches the fd, the reading loop recreates
// the device by name with the same options (OnEvent then tells the owner to
// put addresses and routes back) and carries on. Writes to a detached
// device are dropped and counted meanwhile.
type ReopeningTUN struct {
	opt    TUNOptions
	cur    atomic.Pointer[TUN]
	mtu    atomic.Int64
	mu     sync.Mutex // serialises reopening and Close
	closed bool
	closeC chan struct{}
}

var (
	_ Device     = (*ReopeningTUN)(nil)
	_ MultiQueue = (*ReopeningTUN)(nil)
)

// OpenReopeningTUN opens the device as OpenTUN does.
func OpenReopeningTUN(opt TUNOptions) (*ReopeningTUN, error) {
	if opt.Logger == nil {
		opt.Logger = slog.Default()
	}
	if opt.Counters == nil {
		opt.Counters = &Counters{}
	}
	t, err := OpenTUN(opt)
	if err != nil {
		return nil, err
	}
	r := &ReopeningTUN{opt: opt, closeC: make(chan struct{})}
	r.cur.Store(t)
	r.mtu.Store(int64(opt.MTU))
	return r, nil
}

// Name implements Device.
func (r *ReopeningTUN) Name() string { return r.opt.Name }

// SetMTU sets the MTU a recreated device gets (the router keeps the live
// device's MTU).
func (r *ReopeningTUN) SetMTU(mtu int) { r.mtu.Store(int64(mtu)) }

// Read implements Device.
func (r *ReopeningTUN) Read(frames []Frame) (int, error) { return reopeningQueue{r, 0}.Read(frames) }

// Write implements Device.
func (r *ReopeningTUN) Write(frames []Frame) error { return reopeningQueue{r, 0}.Write(frames) }

// Queues implements MultiQueue: as many as the device has now, each
// following the device through recreation.
func (r *ReopeningTUN) Queues() []Queue {
	qs := make([]Queue, len(r.cur.Load().queues))
	for i := range qs {
		qs[i] = reopeningQueue{r, i}
	}
	return qs
}

// reopeningQueue is queue i of whichever device is current. A recreated
// device that came back with fewer queues (attached as it was found)
// shares them out.
type reopeningQueue struct {
	r *ReopeningTUN
	i int
}

func (q reopeningQueue) queue(t *TUN) *tunQueue { return t.queues[q.i%len(t.queues)] }

func (q reopeningQueue) Read(frames []Frame) (int, error) {
	for {
		t := q.r.cur.Load()
		n, err := q.queue(t).Read(frames)
		if !q.r.replaced(err) {
			return n, err
		}
		// reopen waits for a reopening another loop started, and returns
		// at once if the device was replaced already.
		if err := q.r.reopen(t); err != nil {
			return 0, err
		}
	}
}

func (q reopeningQueue) Write(frames []Frame) error {
	err := q.queue(q.r.cur.Load()).Write(frames)
	if q.r.replaced(err) {
		q.r.opt.Counters.Add(DropTUNWrite, uint64(len(frames)))
		return nil // the reading loops recreate the device
	}
	return err
}

// replaced reports whether err means the device under a queue went away
// (deleted, or closed by a reopening) while the ReopeningTUN itself is
// open: the queue carries on with the recreated device.
func (r *ReopeningTUN) replaced(err error) bool {
	if errors.Is(err, ErrDetached) {
		return true
	}
	if !errors.Is(err, os.ErrClosed) {
		return false
	}
	select {
	case <-r.closeC:
		return false // closed by its owner: stop
	default:
		return true
	}
}

// Close implements Device.
func (r *ReopeningTUN) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	close(r.closeC)
	return r.cur.Load().Close()
}

// reopen replaces the dead device old, retrying with backoff until it
// succeeds or the device is closed.
func (r *ReopeningTUN) reopen(old *TUN) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return os.ErrClosed
	}
	if r.cur.Load() != old {
		return nil // reopened already
	}
	old.Close()
	log := r.opt.Logger
	log.Warn("TUN device was deleted; recreating it", "tun", r.opt.Name)
	delay := 50 * time.Millisecond
	for {
		opt := r.opt
		opt.MTU = int(r.mtu.Load())
		t, err := OpenTUN(opt)
		if err == nil {
			r.cur.Store(t)
			r.opt.Counters.Add(TUNRecreated, 1)
			log.Info("TUN device recreated", "tun", r.opt.Name)
			if r.opt.OnEvent != nil {
				r.opt.OnEvent()
			}
			return nil
		}
		log.Warn("recreate TUN device", "tun", r.opt.Name, "retry_in", delay, "err", err)
		r.mu.Unlock()
		select {
		case <-r.closeC:
		case <-time.After(delay):
		}
		r.mu.Lock()
		if r.closed {
			return os.ErrClosed
		}
		delay = min(2*delay, 2*time.Second)
	}
}
