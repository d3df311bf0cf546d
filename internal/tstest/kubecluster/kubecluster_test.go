package kubecluster

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"github.com/tulle-net/tulle/internal/rootfs"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestDockerArchive: the archive holds what `ctr images import` reads — a
// manifest naming the config and layer, a config whose diff_id is the
// layer's digest, the entrypoint — and the layer holds the file.
func TestDockerArchive(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	os.WriteFile(bin, []byte("#!binary"), 0o755)
	layer := filepath.Join(dir, "layer.tar")
	img := rootfs.Empty()
	img.Copy(bin, "testpod", 0o755)
	if err := img.Write(layer); err != nil {
		t.Fatal(err)
	}
	archive := filepath.Join(dir, "img.tar")
	if err := writeDockerArchive(archive, imageConfig{Refs: []string{PauseImage}, Entrypoint: []string{"/testpod", "pause"}}, layer); err != nil {
		t.Fatal(err)
	}
	files := readTar(t, archive)
	var manifest []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	if err := json.Unmarshal(files["manifest.json"], &manifest); err != nil || len(manifest) != 1 {
		t.Fatalf("manifest.json: %v %s", err, files["manifest.json"])
	}
	m := manifest[0]
	if len(m.RepoTags) != 1 || m.RepoTags[0] != PauseImage || len(m.Layers) != 1 {
		t.Errorf("manifest %+v", m)
	}
	var config struct {
		Config struct{ Entrypoint []string }
		RootFS struct {
			DiffIDs []string `json:"diff_ids"`
		} `json:"rootfs"`
	}
	if err := json.Unmarshal(files[m.Config], &config); err != nil {
		t.Fatalf("config %s: %v", m.Config, err)
	}
	sum := sha256.Sum256(files[m.Layers[0]])
	if len(config.RootFS.DiffIDs) != 1 || config.RootFS.DiffIDs[0] != "sha256:"+hex.EncodeToString(sum[:]) {
		t.Errorf("diff_ids %v, layer digest %x", config.RootFS.DiffIDs, sum)
	}
	if got := config.Config.Entrypoint; len(got) != 2 || got[1] != "pause" {
		t.Errorf("entrypoint %v", got)
	}
	os.WriteFile(filepath.Join(dir, "layer-out.tar"), files[m.Layers[0]], 0o644)
	if in := readTar(t, filepath.Join(dir, "layer-out.tar")); string(in["testpod"]) != "#!binary" {
		t.Errorf("layer holds %v", in)
	}
}

func readTar(t *testing.T, path string) map[string][]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string][]byte{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out[h.Name], _ = io.ReadAll(tr)
	}
}

func TestHostPath(t *testing.T) {
	n := &Node{Dir: "/d/n1"}
	for in, want := range map[string]string{
		"/run/tulle":                 "/d/n1/tulle-run",
		"/run/tulle/tulled.sock":     "/d/n1/tulle-run/tulled.sock",
		"/var/lib/cni/tulle/tulle":   "/d/n1/cni-state/tulle/tulle",
		"/var/lib/kubelet":           "/d/n1/kubelet",
		"/var/lib/kubeletx":          "",
		"/etc/passwd":                "",
		"/opt/cni/bin/tulle":         "/d/n1/cni-bin/tulle",
		"/var/lib/tulle/wireguard.k": "/d/n1/tulle-state/wireguard.k",
	} {
		if got := n.Host(in); got != want {
			t.Errorf("Host(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestTulleDownOverlaps(t *testing.T) {
	t0 := time.Unix(1000, 0)
	d := &TulleDown{down: map[string][]Interval{"n1": {{t0, t0.Add(4 * time.Second)}}}, current: map[string]time.Time{}}
	for _, tc := range []struct {
		node     string
		from, to time.Duration
		want     bool
	}{
		{"n1", 1 * time.Second, 2 * time.Second, true},         // inside
		{"n1", -3 * time.Second, 0, true},                      // touches the start
		{"n1", 4500 * time.Millisecond, 6 * time.Second, true}, // within the margin after
		{"n1", 6 * time.Second, 7 * time.Second, false},        // well after
		{"n1", -5 * time.Second, -2 * time.Second, false},
		{"n2", 1 * time.Second, 2 * time.Second, false}, // another node
	} {
		if got := d.Overlaps(tc.node, t0.Add(tc.from), t0.Add(tc.to), time.Second); got != tc.want {
			t.Errorf("Overlaps(%s, %v, %v) = %v, want %v", tc.node, tc.from, tc.to, got, tc.want)
		}
	}
}
