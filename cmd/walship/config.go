package main

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"
)

// Settings come from three places, the first that gives a flag winning:
//
//  1. the command line;
//  2. the environment: WALSHIP_<COMMAND>_<FLAG> (WALSHIP_STATUS_DSN), then
//     WALSHIP_<FLAG> (WALSHIP_DSN), the flag's name in capitals with '_' for '-';
//  3. the file of --config (or of WALSHIP_CONFIG): lines 'name = value' as in
//     postgresql.conf, before any section for every command, under '[tail]',
//     '[standby init]' and so on for that command alone, which wins over the former.
//
// A repeatable flag (--to) takes several values: repeat the line in the file,
// separate them by commas in the environment.
const configHelp = "read settings from FILE (name = value lines; see deploy/walship.conf); flags win over WALSHIP_* environment variables, which win over the file"

// repeatable is a flag that may be given more than once.
type repeatable interface{ repeatable() }

func (*addrList) repeatable()  {}
func (*multiFlag) repeatable() {}
func (mapFlag) repeatable()    {}

// envNames returns the environment variables that set flag name of command cmd,
// the one that wins first.
func envNames(cmd, name string) []string {
	up := func(s string) string { return strings.ToUpper(strings.NewReplacer("-", "_", " ", "_").Replace(s)) }
	return []string{"WALSHIP_" + up(cmd) + "_" + up(name), "WALSHIP_" + up(name)}
}

// applySettings gives each flag of fs that the command line left unset its value from
// the environment or the config file. cmd is the command's name, as in its section.
func applySettings(fs *flag.FlagSet, cmd string) error {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	// The environment.
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if err != nil || set[f.Name] || f.Name == "config" {
			return
		}
		for _, env := range envNames(cmd, f.Name) {
			v, ok := os.LookupEnv(env)
			if !ok {
				continue
			}
			values := []string{v}
			if _, ok := f.Value.(repeatable); ok {
				values = strings.Split(v, ",")
			}
			for _, v := range values {
				if e := setFlag(f, strings.TrimSpace(v)); e != nil {
					err = fmt.Errorf("%s: %v", env, e)
					return
				}
			}
			set[f.Name] = true
			return
		}
	})
	if err != nil {
		return err
	}
	// The file.
	path := fs.Lookup("config").Value.String()
	if path == "" {
		path = os.Getenv("WALSHIP_CONFIG")
	}
	if path == "" {
		return nil
	}
	settings, err := readConfig(path)
	if err != nil {
		return err
	}
	known := allFlagNames()
	var fromSection = map[string]bool{}
	for _, section := range []string{cmd, ""} {
		for _, s := range settings {
			if s.section != section {
				continue
			}
			f := fs.Lookup(s.name)
			switch {
			case s.name == "config":
				return fmt.Errorf("%s:%d: a config file cannot name another", path, s.line)
			case f == nil && (section != "" || !known[s.name]):
				return fmt.Errorf("%s:%d: walship %s has no setting %q", path, s.line, orAny(section), s.name)
			case f == nil || set[s.name]:
				continue // another command's, or given on the command line or in the environment
			case section == "" && fromSection[s.name]:
				continue // the command's own section wins
			}
			if err := setFlag(f, s.value); err != nil {
				return fmt.Errorf("%s:%d: %s: %v", path, s.line, s.name, err)
			}
			if section != "" {
				fromSection[s.name] = true
			}
		}
	}
	return nil
}

func orAny(section string) string {
	if section == "" {
		return "command"
	}
	return section
}

// setFlag sets f to v, taking on/off and yes/no for booleans as postgresql.conf does.
func setFlag(f *flag.Flag, v string) error {
	if b, ok := f.Value.(interface{ IsBoolFlag() bool }); ok && b.IsBoolFlag() {
		switch strings.ToLower(v) {
		case "on", "yes":
			v = "true"
		case "off", "no":
			v = "false"
		}
		if f.Value.Set(v) != nil {
			return fmt.Errorf("%q: want true or false (on or off, yes or no)", v)
		}
		return nil
	}
	err := f.Value.Set(v)
	if err == nil {
		return nil
	}
	// The flag package's own values say only "parse error".
	if g, ok := f.Value.(flag.Getter); ok {
		switch g.Get().(type) {
		case time.Duration:
			return fmt.Errorf("%q: want a duration such as 500ms, 5s or 2m", v)
		case int, int64, uint, uint64:
			return fmt.Errorf("%q: want a whole number", v)
		case float64:
			return fmt.Errorf("%q: want a number", v)
		}
	}
	return err
}

type setting struct {
	section, name, value string
	line                 int
}

// readConfig reads a config file: 'name = value' lines, '#' comments, '[command]'
// sections; a value may be quoted in single quotes (” for a quote), and must be to
// hold a '#' or leading or trailing spaces. A flag given twice in the same section is
// an error, unless it is repeatable, which the caller checks as it sets it.
func readConfig(path string) ([]setting, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("--config: %w", err)
	}
	defer func() { _ = f.Close() }() // read only
	var out []setting
	seen := map[[2]string]int{}
	section := ""
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		if line[0] == '[' {
			end := strings.IndexByte(line, ']')
			if end < 0 || strings.TrimSpace(stripComment(line[end+1:])) != "" {
				return nil, fmt.Errorf("%s:%d: want [command]", path, n)
			}
			section = strings.Join(strings.Fields(line[1:end]), " ")
			if !isCommand(section) {
				return nil, fmt.Errorf("%s:%d: [%s] is no walship command", path, n, section)
			}
			continue
		}
		name, value, ok := strings.Cut(line, "=")
		name = strings.TrimSpace(name)
		if !ok || name == "" {
			return nil, fmt.Errorf("%s:%d: want name = value", path, n)
		}
		value, err := configValue(strings.TrimSpace(value))
		if err != nil {
			return nil, fmt.Errorf("%s:%d: %s: %v", path, n, name, err)
		}
		key := [2]string{section, name}
		if first, dup := seen[key]; dup && !repeatableName(name) {
			return nil, fmt.Errorf("%s:%d: %s is already set on line %d", path, n, name, first)
		}
		seen[key] = n
		out = append(out, setting{section, name, value, n})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("--config %s: %w", path, err)
	}
	// As libpq ignores a password file others can read, a password that every user
	// can read is refused.
	if fi, err := f.Stat(); err == nil && fi.Mode().Perm()&0o004 != 0 {
		for _, s := range out {
			if passwordSetting.MatchString(s.value) || passwordInURL.MatchString(s.value) {
				return nil, fmt.Errorf("%s:%d: %s holds a password and every user can read the file: chmod o-r %s", path, s.line, s.name, path)
			}
		}
	}
	return out, nil
}

// configValue unquotes a value and strips its comment.
func configValue(v string) (string, error) {
	if !strings.HasPrefix(v, "'") {
		return strings.TrimSpace(stripComment(v)), nil
	}
	var b strings.Builder
	for i := 1; i < len(v); i++ {
		if v[i] != '\'' {
			b.WriteByte(v[i])
			continue
		}
		if i+1 < len(v) && v[i+1] == '\'' {
			b.WriteByte('\'')
			i++
			continue
		}
		if rest := strings.TrimSpace(stripComment(v[i+1:])); rest != "" {
			return "", fmt.Errorf("%q after the closing quote", rest)
		}
		return b.String(), nil
	}
	return "", fmt.Errorf("no closing quote")
}

func stripComment(s string) string {
	if i := strings.IndexByte(s, '#'); i >= 0 {
		return s[:i]
	}
	return s
}

// isCommand says whether name is a command that takes flags, as a section names it.
func isCommand(name string) bool {
	_, ok := commandFlags()[name]
	return ok
}

func repeatableName(name string) bool {
	for _, fs := range commandFlags() {
		if f := fs.Lookup(name); f != nil {
			if _, ok := f.Value.(repeatable); ok {
				return true
			}
		}
	}
	return false
}

// allFlagNames is every flag any command takes: a file's settings outside a section
// may belong to another command, but not to none.
func allFlagNames() map[string]bool {
	names := map[string]bool{}
	for _, fs := range commandFlags() {
		fs.VisitAll(func(f *flag.Flag) { names[f.Name] = true })
	}
	return names
}

// listing, while commandFlags runs, collects each command's flag set instead of
// parsing: every command defines its flags and then parses, so running it with
// listing set defines them and returns at once.
var listing map[string]*flag.FlagSet

// commandFlags returns the flag set of each command that takes flags, by its name.
func commandFlags() map[string]*flag.FlagSet {
	if listing != nil {
		return listing
	}
	listing = map[string]*flag.FlagSet{}
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		switch n {
		case "standby":
			runStandbyInit(nil)
			runStandbyRejoin(nil)
			continue
		case "archive":
			runArchiveVerify(nil)
			runArchiveExpire(nil)
			continue
		}
		commands[n].run(nil)
	}
	all := listing
	listing = nil
	return all
}
