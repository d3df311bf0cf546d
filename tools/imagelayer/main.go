// Command imagelayer writes the layer of tulle's image that is not Go:
// nft (which tulled runs, through knftables, for NetworkPolicy) with the
// shared libraries it loads, and the files it reads (/etc/protocols,
// /etc/services), taken from this machine. `make image` runs it.
//
//	go run ./tools/imagelayer -o bin/nft-layer.tar
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/tulle-net/tulle/internal/rootfs"
)

func main() {
	out := flag.String("o", "", "layer tar to write")
	flag.Parse()
	if *out == "" || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "usage: imagelayer -o LAYER.tar")
		os.Exit(2)
	}
	l := rootfs.New()
	for _, f := range []string{"/etc/protocols", "/etc/services"} {
		if _, err := os.Stat(f); err != nil {
			fmt.Fprintf(os.Stderr, "imagelayer: %v (apt-get install netbase)\n", err)
			os.Exit(1)
		}
		l.Copy(f, f[1:], 0o644)
	}
	if err := l.Program("/usr/sbin/nft"); err != nil {
		fmt.Fprintf(os.Stderr, "imagelayer: %v (apt-get install nftables)\n", err)
		os.Exit(1)
	}
	if err := l.Write(*out); err != nil {
		fmt.Fprintf(os.Stderr, "imagelayer: %v\n", err)
		os.Exit(1)
	}
}
