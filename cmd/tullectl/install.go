package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containernetworking/cni/libcni"

	"github.com/tulle-net/tulle/internal/atomicfile"
)

// installCNI copies the CNI plugin and its conflist into the host's CNI
// directories (the DaemonSet's init container). Each file is written
// next to its destination and renamed into place, so the container
// runtime never reads half a plugin or half a config; a conflist that
// does not parse is refused before anything is written.
func installCNI(args []string) error {
	fs := flag.NewFlagSet("install-cni", flag.ContinueOnError)
	plugin := fs.String("plugin", "/usr/local/bin/tulle", "the CNI plugin binary to install")
	conflist := fs.String("conflist", "/etc/tulle/10-tulle.conflist", "the network configuration list to install")
	binDir := fs.String("bin-dir", "/opt/cni/bin", "the host's CNI plugin directory")
	confDir := fs.String("conf-dir", "/etc/cni/net.d", "the host's CNI configuration directory")
	if err := fs.Parse(args); err != nil {
		return err
	}
	conf, err := os.ReadFile(*conflist)
	if err != nil {
		return fmt.Errorf("install-cni: %w", err)
	}
	if _, err := libcni.ConfListFromBytes(conf); err != nil {
		return fmt.Errorf("install-cni: %s: %w", *conflist, err)
	}
	bin, err := os.ReadFile(*plugin)
	if err != nil {
		return fmt.Errorf("install-cni: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(*binDir, "tulle"), bin, 0o755); err != nil {
		return fmt.Errorf("install-cni: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(*confDir, filepath.Base(*conflist)), conf, 0o644); err != nil {
		return fmt.Errorf("install-cni: %w", err)
	}
	fmt.Printf("installed %s and %s\n", filepath.Join(*binDir, "tulle"), filepath.Join(*confDir, filepath.Base(*conflist)))
	return nil
}
