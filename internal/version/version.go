// Package version is the build's version: `git describe` of the tree it
// was built from, stamped by `make build` with
// -ldflags "-X github.com/tulle-net/tulle/internal/version.Version=…";
// "dev" for a plain go build.
package version

import "runtime"

// Version is the release or `git describe` string.
var Version = "dev"

// String is the version with the Go toolchain that built it.
func String() string { return Version + " (" + runtime.Version() + ")" }
