package rootfs

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tulle-net/tulle/internal/tstest/testenv"
)

// TestRootfs: a layer assembled from this machine's programs runs — a
// dynamic program with the libraries ldd names, reached through the
// merged-/usr links — and holds the image's own files and links; a
// program that is not installed is an error naming it.
func TestRootfs(t *testing.T) {
	testenv.Require(t, rootOnly())
	testenv.RequireTools(t, "ldd", "tar", "chroot")
	r := New()
	if err := r.Program("/usr/bin/bash"); err != nil {
		t.Fatal(err)
	}
	r.Link("bin/sh", "bash")
	r.File("etc/greeting", []byte("hello from the image\n"), 0o644)
	r.Dir("uploads", 0o755)
	dir := t.TempDir()
	layer := filepath.Join(dir, "layer.tar")
	if err := r.Write(layer); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(dir, "root")
	os.Mkdir(root, 0o755)
	if out, err := exec.Command("tar", "-xf", layer, "-C", root).CombinedOutput(); err != nil {
		t.Fatalf("tar: %v: %s", err, out)
	}
	out, err := exec.Command("chroot", root, "/bin/sh", "-c", "read -r l < /etc/greeting; echo \"$l\"; test -d /uploads && test -d /tmp && echo dirs").CombinedOutput()
	if err != nil {
		t.Fatalf("the image's /bin/sh did not run: %v: %s", err, out)
	}
	if got := string(out); got != "hello from the image\ndirs\n" {
		t.Errorf("image's shell said %q", got)
	}
	for _, l := range []string{"bin", "lib", "lib64", "sbin"} {
		if dst, err := os.Readlink(filepath.Join(root, l)); err != nil || dst != "usr/"+l {
			t.Errorf("/%s → %q (%v), want usr/%s", l, dst, err, l)
		}
	}
	if err := New().Program("/usr/bin/no-such-program"); err == nil || !strings.Contains(err.Error(), "no-such-program") {
		t.Errorf("missing program: %v", err)
	}
}

func rootOnly() string {
	if os.Geteuid() != 0 {
		return "needs root (chroot)"
	}
	return ""
}
