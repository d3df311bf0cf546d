// Package rootfs assembles image layers from this machine's own files:
// no registry can be reached, so images (tulle's own, the test images)
// are made of the programs Debian installed here, with their shared
// libraries. It writes tar layers and touches nothing else.
package rootfs

import (
	"archive/tar"
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// Layer assembles an image layer from this machine's own files, since no
// registry can be reached: programs Debian installed here, each with the
// shared libraries its loader needs (as ldd lists them), and the image's
// own files, links and directories. The layout is Debian 12's merged /usr
// (/bin, /sbin, /lib and /lib64 link into /usr), so a program or library
// lands where the host has it and its loader finds it there.
type Layer struct {
	entries map[string]rootEntry // by path in the image, without a leading /
}

type rootEntry struct {
	src  string // a host file to copy, or ""
	body []byte // else the content
	link string // a symlink's target, or ""
	dir  bool
	mode os.FileMode
}

// New returns a layer with the directories and files every image has.
func New() *Layer {
	r := Empty()
	for _, d := range []string{"usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "etc", "root", "dev", "proc", "sys", "run", "var"} {
		r.Dir(d, 0o755)
	}
	r.Dir("tmp", 0o1777)
	for _, l := range []string{"bin", "sbin", "lib", "lib64"} {
		r.Link(l, "usr/"+l)
	}
	// Mount points the runtime binds over, present as in any image.
	for _, f := range []string{"etc/hosts", "etc/hostname", "etc/resolv.conf"} {
		r.File(f, nil, 0o644)
	}
	// glibc's resolver: files, then DNS (the pod's resolv.conf).
	r.File("etc/nsswitch.conf", []byte("passwd: files\ngroup: files\nhosts: files dns\n"), 0o644)
	return r
}

// Empty returns a layer with nothing in it.
func Empty() *Layer { return &Layer{entries: map[string]rootEntry{}} }

// merged maps p to where it is under merged /usr.
func merged(p string) string {
	p = strings.TrimPrefix(path.Clean("/"+p), "/")
	for _, l := range []string{"bin/", "sbin/", "lib/", "lib64/"} {
		if strings.HasPrefix(p, l) {
			return "usr/" + p
		}
	}
	return p
}

func (r *Layer) Dir(p string, mode os.FileMode) {
	r.entries[merged(p)] = rootEntry{dir: true, mode: mode}
}

func (r *Layer) File(p string, body []byte, mode os.FileMode) {
	r.entries[merged(p)] = rootEntry{body: body, mode: mode}
}

// Link makes p a symlink to target.
func (r *Layer) Link(p, target string) {
	r.entries[merged(p)] = rootEntry{link: target}
}

// Has reports whether the image has p already.
func (r *Layer) Has(p string) bool {
	_, ok := r.entries[merged(p)]
	return ok
}

// Copy puts the host file src at p (its content, symlinks followed).
func (r *Layer) Copy(src, p string, mode os.FileMode) {
	r.entries[merged(p)] = rootEntry{src: src, mode: mode}
}

// Program copies the host program at hostPath to the same path in the
// image, with every shared library ldd says it loads (and the loader).
func (r *Layer) Program(hostPath string) error {
	real, err := filepath.EvalSymlinks(hostPath)
	if err != nil {
		return fmt.Errorf("image program %s: %w (apt-get install the package that has it)", hostPath, err)
	}
	r.Copy(real, hostPath, 0o755)
	if real != hostPath {
		r.Copy(real, real, 0o755)
	}
	libs, err := sharedLibs(real)
	if err != nil {
		return err
	}
	for _, l := range libs {
		// Under the name the loader asks for, in its real directory.
		dir, err := filepath.EvalSymlinks(filepath.Dir(l))
		if err != nil {
			return err
		}
		if !r.Has(filepath.Join(dir, filepath.Base(l))) {
			r.Copy(l, filepath.Join(dir, filepath.Base(l)), 0o755)
		}
	}
	return nil
}

// sharedLibs is what ldd lists for a dynamic program: every library path
// and the loader; none for a static one.
func sharedLibs(prog string) ([]string, error) {
	out, err := exec.Command("ldd", prog).CombinedOutput()
	if err != nil {
		if bytes.Contains(out, []byte("not a dynamic executable")) {
			return nil, nil
		}
		return nil, fmt.Errorf("ldd %s: %w: %s", prog, err, out)
	}
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			libs = append(libs, f[2])
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			libs = append(libs, f[0]) // the loader
		case len(f) >= 3 && f[1] == "=>" && f[2] == "not":
			return nil, fmt.Errorf("ldd %s: %s not found", prog, f[0])
		}
	}
	return libs, nil
}

// Write writes the layer as a tar, parents before children.
func (r *Layer) Write(dst string) error {
	names := make([]string, 0, len(r.entries))
	for n := range r.entries {
		names = append(names, n)
	}
	sort.Strings(names)
	f, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	made := map[string]bool{}
	epoch := time.Unix(0, 0)
	var parents func(p string) error
	parents = func(p string) error {
		d := path.Dir(p)
		if d == "." || made[d] {
			return nil
		}
		if e, ok := r.entries[d]; ok && !e.dir {
			return fmt.Errorf("image path %s: %s is not a directory", p, d)
		}
		if err := parents(d); err != nil {
			return err
		}
		made[d] = true
		mode := os.FileMode(0o755)
		if e, ok := r.entries[d]; ok {
			mode = e.mode
		}
		return tw.WriteHeader(&tar.Header{Name: d + "/", Mode: int64(mode), Typeflag: tar.TypeDir, ModTime: epoch})
	}
	for _, n := range names {
		e := r.entries[n]
		if err := parents(n); err != nil {
			return err
		}
		h := &tar.Header{Name: n, Mode: int64(e.mode), ModTime: epoch}
		var body []byte
		switch {
		case e.dir:
			if made[n] {
				continue
			}
			made[n] = true
			h.Name, h.Typeflag = n+"/", tar.TypeDir
		case e.link != "":
			h.Typeflag, h.Linkname, h.Mode = tar.TypeSymlink, e.link, 0o777
		case e.src != "":
			if body, err = os.ReadFile(e.src); err != nil {
				return fmt.Errorf("image file %s: %w", n, err)
			}
			h.Typeflag = tar.TypeReg
		default:
			body, h.Typeflag = e.body, tar.TypeReg
		}
		h.Size = int64(len(body))
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if _, err := tw.Write(body); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return f.Close()
}
