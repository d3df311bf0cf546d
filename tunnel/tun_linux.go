package tunnel

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"
)

// TUNOptions configure OpenTUN.
type TUNOptions struct {
	Name string
	MTU  int
	// Queues is how many queues to open (IFF_MULTI_QUEUE when above 1):
	// one per tx loop, so several cores read the device. The kernel keeps
	// each flow on one queue. An existing device made with the other
	// queue mode is attached as it is (a restart never deletes a device
	// running pods route through); it is then read by one queue.
	Queues int
	// GRO coalesces plain packets on write (through wireguard-go's GRO) and
	// lets UDP super-packets (USO) through the device. Off, every plain
	// packet is written alone and the device never sees UDP GSO, for kernels
	// whose UDP GRO handling is broken.
	GRO      bool
	Counters *Counters
	Logger   *slog.Logger
	// OnEvent is called (from a goroutine of the device) when the link goes
	// up or down or its MTU changes, so the owner can reconcile.
	OnEvent func()
}

// TUN is a Linux TUN device with virtio-net headers (IFF_VNET_HDR) and
// TSO/USO offloads, with one or more queues. Frames are read and written
// raw, super-packets whole; plain packets may be written through
// wireguard-go's GRO path.
//
// The device is made persistent (TUNSETPERSIST): closing the TUN, or the
// process dying, leaves the interface, its addresses and routes in place, so
// a restarted tulled re-attaches by name and traffic resumes. DeleteTUN
// removes it.
type TUN struct {
	name   string
	queues []*tunQueue
	gro    atomic.Bool
	ctr    *Counters
	log    *slog.Logger

	closed atomic.Bool
}

// tunQueue is one queue's fd and its write state. Read is called by one
// loop; Write by receive loops and ICMP replies: writeMu.
//
// Each queue has its own wireguard-go device on its fd, for what
// wireguard-go does well: MTU, offload negotiation, link events (queue
// 0's are used) and GRO writes. GRO writes must leave through the queue's
// own fd: the kernel steers a flow's outgoing packets to the queue its
// incoming packets were last written on.
type tunQueue struct {
	t       *TUN
	wg      wgtun.Device
	rc      syscall.RawConn
	writeMu sync.Mutex
	groBufs [][]byte // 64 KiB buffers for the GRO path, made on first use
	groN    int
	vhdr    [VirtioHdrLen]byte
	iov     [2]unix.Iovec
}

var (
	_ Device     = (*TUN)(nil)
	_ MultiQueue = (*TUN)(nil)
)

// tunFlags are the flags tulle's TUN devices have, besides IFF_MULTI_QUEUE.
const tunFlags = unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_VNET_HDR

// attachQueue opens /dev/net/tun and attaches it to the named device as a
// queue (creating the device if there is none).
func attachQueue(name string, flags uint16) (int, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("tun name %q: %w", name, err)
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return -1, err
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("tun %s: %w", name, err)
	}
	return fd, nil
}

// OpenTUN creates the named TUN device, or attaches to it if a persistent one
// exists, and configures MTU and offloads.
func OpenTUN(opt TUNOptions) (*TUN, error) {
	if opt.Logger == nil {
		opt.Logger = slog.Default()
	}
	if opt.Counters == nil {
		opt.Counters = &Counters{}
	}
	nq := max(opt.Queues, 1)
	var flags uint16 = tunFlags
	if nq > 1 {
		flags |= unix.IFF_MULTI_QUEUE
	}
	fd, err := attachQueue(opt.Name, flags)
	if errors.Is(err, unix.EINVAL) {
		// A persistent device of the other queue mode: take it as it is.
		flags ^= unix.IFF_MULTI_QUEUE
		if fd, err = attachQueue(opt.Name, flags); err == nil && nq > 1 {
			opt.Logger.Warn("existing TUN device is single-queue: read by one loop (delete it, e.g. with tulled cleanup, to get queues)", "tun", opt.Name, "queues_wanted", nq)
		}
		nq = 1
	}
	if err != nil {
		return nil, fmt.Errorf("attach tun %s (a non-TUN link of that name, or one in use?): %w", opt.Name, err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 1); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tun %s: set persistent: %w", opt.Name, err)
	}
	t := &TUN{name: opt.Name, ctr: opt.Counters, log: opt.Logger}
	t.gro.Store(opt.GRO)
	if err := t.addQueue(fd, opt.MTU); err != nil {
		return nil, err
	}
	for len(t.queues) < nq {
		fd, err := attachQueue(opt.Name, flags)
		if err == nil {
			err = t.addQueue(fd, opt.MTU)
		}
		if err != nil {
			t.Close()
			return nil, fmt.Errorf("tun %s: attach queue %d: %w", opt.Name, len(t.queues), err)
		}
	}
	if !opt.GRO {
		// TCP offloads only: no UDP GSO packets in either direction.
		var serr error
		t.queues[0].rc.Control(func(fd uintptr) {
			serr = unix.IoctlSetInt(int(fd), unix.TUNSETOFFLOAD, unix.TUN_F_CSUM|unix.TUN_F_TSO4|unix.TUN_F_TSO6)
		})
		if serr != nil {
			t.Close()
			return nil, fmt.Errorf("tun %s: set offloads: %w", opt.Name, serr)
		}
	}
	for i, q := range t.queues {
		go func() {
			for range q.wg.Events() { // every queue's device watches the link
				if i == 0 && opt.OnEvent != nil {
					opt.OnEvent()
				}
			}
		}()
	}
	return t, nil
}

// addQueue takes over fd as the next queue.
func (t *TUN) addQueue(fd, mtu int) error {
	file := os.NewFile(uintptr(fd), "/dev/net/tun")
	// wireguard-go sets the MTU, turns on TSO (and USO where the kernel has
	// it) and watches the link; we read and write frames on the same fd.
	wg, err := wgtun.CreateTUNFromFile(file, mtu)
	if err != nil {
		file.Close()
		return fmt.Errorf("tun %s: %w", t.name, err)
	}
	rc, err := file.SyscallConn()
	if err != nil {
		wg.Close()
		return fmt.Errorf("tun %s: %w", t.name, err)
	}
	// The GRO buffers are made on first use: a queue that only ever
	// carries a few packets per write (the sparse queue) keeps a few.
	q := &tunQueue{t: t, wg: wg, rc: rc, groBufs: make([][]byte, 64)}
	t.queues = append(t.queues, q)
	return nil
}

// Name implements Device.
func (t *TUN) Name() string { return t.name }

// Queues implements MultiQueue.
func (t *TUN) Queues() []Queue {
	qs := make([]Queue, len(t.queues))
	for i, q := range t.queues {
		qs[i] = q
	}
	return qs
}

// Close implements Device: every queue detaches. The interface stays (it
// is persistent).
func (t *TUN) Close() error {
	if t.closed.Swap(true) {
		return nil
	}
	var errs []error
	for _, q := range t.queues {
		errs = append(errs, q.wg.Close()) // closes the queue's fd
	}
	return errors.Join(errs...)
}

// gone maps the errors of a dead fd: ErrDetached when the interface was
// deleted under an open fd, os.ErrClosed after Close.
func (t *TUN) gone(error) error {
	if t.closed.Load() {
		return os.ErrClosed
	}
	return ErrDetached
}

// Read implements Device: queue 0's.
func (t *TUN) Read(frames []Frame) (int, error) { return t.queues[0].Read(frames) }

// Write implements Device: through queue 0.
func (t *TUN) Write(frames []Frame) error { return t.queues[0].Write(frames) }

// Read implements Queue: one read(2) per frame, as many as are ready
// without blocking, after blocking for the first.
func (q *tunQueue) Read(frames []Frame) (int, error) {
	t := q.t
	n := 0
	var rerr error
	err := q.rc.Read(func(fd uintptr) bool {
		for n < len(frames) {
			f := &frames[n]
			buf := f.Buf[:cap(f.Buf)]
			m, err := unix.Read(int(fd), buf[Headroom-VirtioHdrLen:])
			if err == unix.EAGAIN {
				return n > 0
			}
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				rerr = err
				return true
			}
			if m < VirtioHdrLen {
				t.ctr.Add(DropMalformed, 1)
				continue
			}
			f.Offload = getVirtioHdr(buf[Headroom-VirtioHdrLen:])
			f.Offload.Flags &= FlagNeedsCsum // DATA_VALID means nothing to a peer
			f.Off = Headroom
			f.Buf = buf[:Headroom-VirtioHdrLen+m]
			n++
		}
		return true
	})
	if n > 0 {
		return n, nil
	}
	if rerr == nil {
		rerr = err
	}
	if errors.Is(rerr, unix.EBADFD) || errors.Is(rerr, os.ErrClosed) {
		return 0, t.gone(rerr)
	}
	return 0, fmt.Errorf("read tun %s: %w", t.name, rerr)
}

// Write implements Queue. Order is kept: runs of plain packets go through
// GRO (when on) and are flushed before the next offloaded frame.
func (q *tunQueue) Write(frames []Frame) error {
	q.writeMu.Lock()
	defer q.writeMu.Unlock()
	for i := range frames {
		f := &frames[i]
		if f.Offload.None() && q.t.gro.Load() {
			if q.groN == len(q.groBufs) {
				if err := q.flushGRO(); err != nil {
					return err
				}
			}
			if q.groBufs[q.groN] == nil {
				q.groBufs[q.groN] = make([]byte, 0, BufSize)
			}
			b := q.groBufs[q.groN][:Headroom]
			q.groBufs[q.groN] = append(b, f.Packet()...)
			q.groN++
			continue
		}
		if err := q.flushGRO(); err != nil {
			return err
		}
		if err := q.writeRaw(f); err != nil {
			return err
		}
	}
	return q.flushGRO()
}

// flushGRO writes the pending plain packets through the queue's
// wireguard-go GRO.
func (q *tunQueue) flushGRO() error {
	if q.groN == 0 {
		return nil
	}
	t := q.t
	bufs := q.groBufs[:q.groN]
	q.groN = 0
	_, err := q.wg.Write(bufs, Headroom)
	t.ctr.Add(GROWrites, uint64(len(bufs)))
	if err == nil {
		return nil
	}
	if errors.Is(err, os.ErrClosed) {
		return t.gone(err)
	}
	t.ctr.Add(DropTUNWrite, 1)
	if errors.Is(err, unix.EINVAL) && t.gro.Swap(false) {
		// Some kernels refuse coalesced writes. Plain packets are written
		// one by one from now on; the knob is --tun-gro.
		t.log.Warn("TUN refused a GRO write (EINVAL); writing packets one by one from now on", "tun", t.name)
	}
	return nil
}

// writeRaw writes one frame with writev(2): the virtio header from the
// queue's own buffer, the packet in place, so nothing in front of it is
// touched.
func (q *tunQueue) writeRaw(f *Frame) error {
	t := q.t
	pkt := f.Packet()
	hdrLen, err := ValidateOffload(pkt, f.Offload)
	if err != nil {
		t.ctr.Add(DropMalformed, 1)
		return nil
	}
	putVirtioHdr(q.vhdr[:], f.Offload, hdrLen)
	q.iov[0].Base = &q.vhdr[0]
	q.iov[0].SetLen(VirtioHdrLen)
	q.iov[1].Base = &pkt[0]
	q.iov[1].SetLen(len(pkt))
	var werr error
	err = q.rc.Write(func(fd uintptr) bool {
		for {
			_, _, e := unix.Syscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&q.iov[0])), 2)
			if e == unix.EINTR {
				continue
			}
			if e != 0 {
				werr = e
			} else {
				werr = nil
			}
			return e != unix.EAGAIN
		}
	})
	if err != nil {
		return t.gone(err)
	}
	if werr != nil {
		if werr == unix.EBADFD {
			return t.gone(werr)
		}
		t.ctr.Add(DropTUNWrite, 1)
	}
	return nil
}

// DeleteTUN removes a (persistent) TUN device by name. A device that is
// already gone is not an error.
func DeleteTUN(name string) error {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open /dev/net/tun: %w", err)
	}
	defer unix.Close(fd)
	if _, err := os.Stat("/sys/class/net/" + name); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	ifr.SetUint16(tunFlags)
	err = unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr)
	if errors.Is(err, unix.EINVAL) { // a multi-queue device
		ifr.SetUint16(tunFlags | unix.IFF_MULTI_QUEUE)
		err = unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr)
	}
	if err != nil {
		return fmt.Errorf("attach tun %s to delete it: %w", name, err)
	}
	// Clearing persist makes the device go away when this fd closes.
	if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 0); err != nil {
		return fmt.Errorf("tun %s: clear persistent: %w", name, err)
	}
	return nil
}
