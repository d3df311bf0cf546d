package kubecluster

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"github.com/tulle-net/tulle/internal/rootfs"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

// The test image and the pause image: one static binary (./testpod), two
// entrypoints. Neither is pulled: the harness builds them and imports them
// into every node's containerd.
const (
	TestImage  = "tulle.test/testpod:1"
	PauseImage = "tulle.test/pause:1"
)

// buildTestImages compiles testpod and writes one docker-archive per image
// into dir, returning their paths.
func buildTestImages(root, dir string) ([]string, error) {
	bin := filepath.Join(dir, "testpod")
	cmd := exec.Command("go", "build", "-trimpath", "-o", bin, "./internal/tstest/kubecluster/testpod")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build testpod: %w: %s", err, out)
	}
	layer := filepath.Join(dir, "testpod-layer.tar")
	img := rootfs.Empty()
	img.Copy(bin, "testpod", 0o755)
	if err := img.Write(layer); err != nil {
		return nil, err
	}
	var archives []string
	for _, img := range []imageConfig{
		{Refs: []string{TestImage}, Entrypoint: []string{"/testpod", "serve"}},
		{Refs: []string{PauseImage, UpstreamPause}, Entrypoint: []string{"/testpod", "pause"}},
	} {
		p, err := img.write(dir, layer)
		if err != nil {
			return nil, err
		}
		archives = append(archives, p)
	}
	return archives, nil
}

// imageConfig is what an image says beside its layer.
type imageConfig struct {
	Refs       []string // the names it is tagged with
	Entrypoint []string
	Cmd        []string
	Env        []string // default PATH=/
}

// write writes the image with layer as a docker-archive in dir, named
// after its first reference, and returns its path.
func (img imageConfig) write(dir, layer string) (string, error) {
	p := filepath.Join(dir, strings.NewReplacer("/", "_", ":", "_").Replace(img.Refs[0])+".tar")
	if err := writeDockerArchive(p, img, layer); err != nil {
		return "", fmt.Errorf("image %s: %w", img.Refs[0], err)
	}
	return p, nil
}

// writeDockerArchive writes the format `docker save` does (and `ctr images
// import` reads): manifest.json, the image config, the layer.
func writeDockerArchive(path string, img imageConfig, layer string) error {
	lb, err := os.ReadFile(layer)
	if err != nil {
		return err
	}
	env := img.Env
	if env == nil {
		env = []string{"PATH=/"}
	}
	sum := sha256.Sum256(lb)
	diffID := "sha256:" + hex.EncodeToString(sum[:])
	config, err := json.Marshal(map[string]any{
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"created":      time.Unix(0, 0).UTC().Format(time.RFC3339),
		"config":       map[string]any{"Entrypoint": img.Entrypoint, "Cmd": img.Cmd, "Env": env},
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{diffID}},
	})
	if err != nil {
		return err
	}
	csum := sha256.Sum256(config)
	configName := hex.EncodeToString(csum[:]) + ".json"
	manifest, err := json.Marshal([]map[string]any{{"Config": configName, "RepoTags": img.Refs, "Layers": []string{"layer.tar"}}})
	if err != nil {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	for _, e := range []struct {
		name string
		body []byte
	}{{"manifest.json", manifest}, {configName, config}, {"layer.tar", lb}} {
		if err := tw.WriteHeader(&tar.Header{Name: e.name, Mode: 0o644, Size: int64(len(e.body)), ModTime: time.Unix(0, 0)}); err != nil {
			return err
		}
		if _, err := tw.Write(e.body); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return f.Close()
}

// BuildTulleImage builds tulle's image the way a user does (`make image`,
// buildah) with the tag, and saves it as a docker-archive named tulle:tag,
// the name the manifests' image "tulle" resolves to.
func BuildTulleImage(root, dir, tag string) (string, error) {
	local := "localhost/tulle:" + tag
	// Binaries of its own (bin/<tag>): another make image at the same time
	// (TestImage) must not put its build into this image.
	bin := filepath.Join("bin", tag)
	defer os.RemoveAll(filepath.Join(root, bin))
	cmd := exec.Command("make", "-s", "-C", root, "image", "VERSION="+tag, "IMAGE="+local, "BIN="+bin)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("make image: %w: %s", err, out)
	}
	defer exec.Command("buildah", "rmi", "-f", local).Run()
	p := filepath.Join(dir, "tulle-"+tag+".tar")
	os.Remove(p)
	if out, err := exec.Command("buildah", "push", local, "docker-archive:"+p+":tulle:"+tag).CombinedOutput(); err != nil {
		return "", fmt.Errorf("buildah push %s: %w: %s", local, err, out)
	}
	return p, nil
}

// copyFile copies src to dst with mode.
func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
