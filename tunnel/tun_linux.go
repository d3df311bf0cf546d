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
// TSO/USO offloads. Frames are read and written raw, super-packets whole;
// plain packets may be written through wireguard-go's GRO path.
//
// The device is made persistent (TUNSETPERSIST): closing the TUN, or the
// process dying, leaves the interface, its addresses and routes in place, so
// a restarted tulled re-attaches by name and traffic resumes. DeleteTUN
// removes it.
type TUN struct {
	name string
	file *os.File
	rc   syscall.RawConn
	wg   wgtun.Device
	gro  bool
	ctr  *Counters
	log  *slog.Logger

	closed  atomic.Bool
	writeMu sync.Mutex // Write is called by the receive loops and for ICMP replies
	groBufs [][]byte   // 64 KiB buffers for the GRO path
	groN    int
	vhdr    [VirtioHdrLen]byte
	iov     [2]unix.Iovec
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
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(opt.Name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tun name %q: %w", opt.Name, err)
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("attach tun %s (a non-TUN link of that name, or one in use?): %w", opt.Name, err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 1); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tun %s: set persistent: %w", opt.Name, err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tun %s: %w", opt.Name, err)
	}
	file := os.NewFile(uintptr(fd), "/dev/net/tun")
	// wireguard-go sets the MTU, turns on TSO (and USO where the kernel has
	// it) and watches the link; we read and write frames on the same fd.
	wg, err := wgtun.CreateTUNFromFile(file, opt.MTU)
	if err != nil {
		file.Close()
		return nil, fmt.Errorf("tun %s: %w", opt.Name, err)
	}
	rc, err := file.SyscallConn()
	if err != nil {
		wg.Close()
		return nil, err
	}
	t := &TUN{name: opt.Name, file: file, rc: rc, wg: wg, gro: opt.GRO, ctr: opt.Counters, log: opt.Logger}
	if !opt.GRO {
		// TCP offloads only: no UDP GSO packets in either direction.
		var serr error
		rc.Control(func(fd uintptr) {
			serr = unix.IoctlSetInt(int(fd), unix.TUNSETOFFLOAD, unix.TUN_F_CSUM|unix.TUN_F_TSO4|unix.TUN_F_TSO6)
		})
		if serr != nil {
			wg.Close()
			return nil, fmt.Errorf("tun %s: set offloads: %w", opt.Name, serr)
		}
	}
	t.groBufs = make([][]byte, 64)
	for i := range t.groBufs {
		t.groBufs[i] = make([]byte, 0, BufSize)
	}
	go func() {
		for range wg.Events() {
			if opt.OnEvent != nil {
				opt.OnEvent()
			}
		}
	}()
	return t, nil
}

// Name implements Device.
func (t *TUN) Name() string { return t.name }

// Close implements Device. The interface stays (it is persistent).
func (t *TUN) Close() error {
	t.closed.Store(true)
	return t.wg.Close()
}

// gone maps the errors of a dead fd: ErrDetached when the interface was
// deleted under an open fd, os.ErrClosed after Close.
func (t *TUN) gone(error) error {
	if t.closed.Load() {
		return os.ErrClosed
	}
	return ErrDetached
}

// Read implements Device: one read(2) per frame, as many as are ready
// without blocking, after blocking for the first.
func (t *TUN) Read(frames []Frame) (int, error) {
	n := 0
	var rerr error
	err := t.rc.Read(func(fd uintptr) bool {
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

// Write implements Device. Order is kept: runs of plain packets go through
// GRO (when on) and are flushed before the next offloaded frame.
func (t *TUN) Write(frames []Frame) error {
	t.writeMu.Lock()
	defer t.writeMu.Unlock()
	for i := range frames {
		f := &frames[i]
		if t.gro && f.Offload.None() {
			if t.groN == len(t.groBufs) {
				if err := t.flushGRO(); err != nil {
					return err
				}
			}
			b := t.groBufs[t.groN][:Headroom]
			t.groBufs[t.groN] = append(b, f.Packet()...)
			t.groN++
			continue
		}
		if err := t.flushGRO(); err != nil {
			return err
		}
		if err := t.writeRaw(f); err != nil {
			return err
		}
	}
	return t.flushGRO()
}

func (t *TUN) flushGRO() error {
	if t.groN == 0 {
		return nil
	}
	bufs := t.groBufs[:t.groN]
	t.groN = 0
	_, err := t.wg.Write(bufs, Headroom)
	t.ctr.Add(GROWrites, uint64(len(bufs)))
	if err == nil {
		return nil
	}
	if errors.Is(err, os.ErrClosed) {
		return t.gone(err)
	}
	t.ctr.Add(DropTUNWrite, 1)
	if errors.Is(err, unix.EINVAL) {
		// Some kernels refuse coalesced writes. Plain packets are written
		// one by one from now on; the knob is --tun-gro.
		t.gro = false
		t.log.Warn("TUN refused a GRO write (EINVAL); writing packets one by one from now on", "tun", t.name)
	}
	return nil
}

// writeRaw writes one frame with writev(2): the virtio header from the TUN's
// own buffer, the packet in place, so nothing in front of it is touched.
func (t *TUN) writeRaw(f *Frame) error {
	pkt := f.Packet()
	hdrLen, err := ValidateOffload(pkt, f.Offload)
	if err != nil {
		t.ctr.Add(DropMalformed, 1)
		return nil
	}
	putVirtioHdr(t.vhdr[:], f.Offload, hdrLen)
	t.iov[0].Base = &t.vhdr[0]
	t.iov[0].SetLen(VirtioHdrLen)
	t.iov[1].Base = &pkt[0]
	t.iov[1].SetLen(len(pkt))
	var werr error
	err = t.rc.Write(func(fd uintptr) bool {
		for {
			_, _, e := unix.Syscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&t.iov[0])), 2)
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
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		return fmt.Errorf("attach tun %s to delete it: %w", name, err)
	}
	// Clearing persist makes the device go away when this fd closes.
	if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 0); err != nil {
		return fmt.Errorf("tun %s: clear persistent: %w", name, err)
	}
	return nil
}
