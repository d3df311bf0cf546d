package main

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tulle-net/tulle/internal/tstest/testenv"
)

// TestImage: `make image` builds the OCI image with buildah; the image
// holds the three binaries and the default configuration, and its tulled
// reports the version make stamped. Without buildah or podman, make image
// fails with one clear line.
func TestImage(t *testing.T) {
	if os.Geteuid() != 0 {
		testenv.Skip(t, "needs root (buildah's storage)")
	}
	testenv.RequireTools(t, "buildah", "make", "git")
	root, _ := filepath.Abs("../..")
	var rnd [3]byte
	rand.Read(rnd[:])
	version := "test-" + hex.EncodeToString(rnd[:])
	image := "localhost/tulle:" + version
	// Its own bin directory: the real-cluster test builds an image at the
	// same time.
	binDir := filepath.Join("bin", version)
	t.Cleanup(func() { os.RemoveAll(filepath.Join(root, binDir)) })
	out, err := exec.Command("make", "-C", root, "image", "VERSION="+version, "IMAGE="+image, "BIN="+binDir).CombinedOutput()
	if err != nil {
		t.Fatalf("make image: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("buildah", "rmi", "-f", image).Run() })
	ctr, err := exec.Command("buildah", "from", image).Output()
	if err != nil {
		t.Fatalf("buildah from: %v", err)
	}
	name := strings.TrimSpace(string(ctr))
	t.Cleanup(func() { exec.Command("buildah", "rm", name).Run() })
	mnt, err := exec.Command("buildah", "mount", name).Output()
	if err != nil {
		t.Fatalf("buildah mount: %v", err)
	}
	dir := strings.TrimSpace(string(mnt))
	t.Cleanup(func() { exec.Command("buildah", "umount", name).Run() })
	for _, f := range []string{"usr/local/bin/tulled", "usr/local/bin/tullectl", "usr/local/bin/tulle", "etc/tulle/10-tulle.conflist", "etc/tulle/net-conf.json"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Errorf("image lacks /%s: %v", f, err)
		}
	}
	// The binaries are static: the image's tulled runs anywhere.
	got, err := exec.Command(filepath.Join(dir, "usr/local/bin/tulled"), "--version").Output()
	if err != nil || !strings.Contains(string(got), version) {
		t.Errorf("the image's tulled --version: %q, %v; want %s", got, err, version)
	}
	// tulled's nft (NetworkPolicy) runs from the image's own libraries.
	if got, err := exec.Command("chroot", dir, "/usr/sbin/nft", "--version").CombinedOutput(); err != nil || !strings.Contains(string(got), "nftables") {
		t.Errorf("the image's nft --version: %q, %v", got, err)
	}
	cfg, _ := exec.Command("buildah", "inspect", "--format", "{{.OCIv1.Config.Entrypoint}}", image).Output()
	if !strings.Contains(string(cfg), "/usr/local/bin/tulled") {
		t.Errorf("entrypoint %q", cfg)
	}

	// No builder on PATH: one line saying what is needed.
	bin := t.TempDir()
	for _, tool := range []string{"go", "git", "sh", "bash"} {
		p, err := exec.LookPath(tool)
		if err != nil {
			t.Fatal(err)
		}
		os.Symlink(p, filepath.Join(bin, tool))
	}
	cmd := exec.Command("make", "-s", "-C", root, "image", "VERSION="+version)
	cmd.Env = append(os.Environ(), "PATH="+bin)
	out, err = cmd.CombinedOutput()
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if err == nil || !strings.Contains(lines[0], "needs buildah or podman") {
		t.Errorf("make image without a builder: %v, %q", err, out)
	}
}
