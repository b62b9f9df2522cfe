package atomicfile

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestWrite(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	if err := os.WriteFile(path, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	write := func(s string) func(*os.File) error {
		return func(f *os.File) error { _, err := f.WriteString(s); return err }
	}
	if err := Write(path, ".f.*", write("new"), nil); err != nil {
		t.Fatal(err)
	}
	// A failing fill or check leaves the file as it was and no temp file.
	boom := errors.New("boom")
	if err := Write(path, ".f.*", func(*os.File) error { return boom }, nil); !errors.Is(err, boom) {
		t.Fatalf("fill error: %v", err)
	}
	if err := Write(path, ".f.*", write("newer"), func() error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("check error: %v", err)
	}
	if got, _ := os.ReadFile(path); string(got) != "new" {
		t.Fatalf("file holds %q, want %q", got, "new")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("directory holds %d entries, want the file alone", len(ents))
	}
}
