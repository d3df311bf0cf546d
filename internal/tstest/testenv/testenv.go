// Package testenv decides what a test does when the machine lacks something
// it needs (root, a tool, a namespace, a real API server): skip with the
// reason on a developer's machine, fail in CI. With TULLE_NO_SKIP set (as
// .ci/run sets it) every would-be skip is a failure, so a CI run can never
// pass by quietly testing nothing.
package testenv

import (
	"os"
	"os/exec"
	"testing"
)

// NoSkipEnv is the variable that turns skips into failures.
const NoSkipEnv = "TULLE_NO_SKIP"

// Strict reports whether skips are failures in this run.
func Strict() bool { return os.Getenv(NoSkipEnv) != "" }

// Skip skips t with the reason, or fails it when Strict.
func Skip(t testing.TB, format string, args ...any) {
	t.Helper()
	if Strict() {
		t.Fatalf("would skip, but "+NoSkipEnv+" is set: "+format, args...)
	}
	t.Skipf(format, args...)
}

// Require skips (or fails) t when why is not empty.
func Require(t testing.TB, why string) {
	t.Helper()
	if why != "" {
		Skip(t, "%s", why)
	}
}

// RequireTools skips (or fails) t unless every named command is on PATH.
func RequireTools(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			Skip(t, "needs %s on PATH", tool)
		}
	}
}
