# raylimit: every target runs as root on Debian 12 (network namespaces, tc, nftables).
.PHONY: setup build install demo test lint bench bench-quick bench-accuracy static static-check fixtures clean-netns test-stock-kernel

MUSL := x86_64-unknown-linux-musl

setup:
	bash scripts/setup.sh

build:
	cargo build --release

# The binary, a man page per command, bash/zsh/fish completions and the systemd unit, under
# $(DESTDIR)$(PREFIX) (default /usr/local), all generated from the binary just built.
PREFIX ?= /usr/local
DESTDIR ?=
install: build
	install -Dm755 target/release/raylimit $(DESTDIR)$(PREFIX)/bin/raylimit
	install -d $(DESTDIR)$(PREFIX)/share/man/man1 $(DESTDIR)$(PREFIX)/share/bash-completion/completions \
		$(DESTDIR)$(PREFIX)/share/zsh/site-functions $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d
	target/release/raylimit manpages $(DESTDIR)$(PREFIX)/share/man/man1
	target/release/raylimit completions bash > $(DESTDIR)$(PREFIX)/share/bash-completion/completions/raylimit
	target/release/raylimit completions zsh > $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_raylimit
	target/release/raylimit completions fish > $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/raylimit.fish
	sed 's|/usr/local/bin/raylimit|$(PREFIX)/bin/raylimit|' contrib/raylimit-watch@.service | \
		install -Dm644 /dev/stdin $(DESTDIR)$(PREFIX)/lib/systemd/system/raylimit-watch@.service

# README command 1: set everything up and show the main job on the built-in demonstration.
demo: setup
	bash scripts/demo.sh

# README command 2: the whole test suite (unit, fixtures, namespaces, real traffic, CLI),
# then the static binary check.
test: setup
	cargo test --all-targets -- --test-threads 2
	$(MAKE) static-check
	@$(MAKE) --no-print-directory clean-netns

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

# A fully static musl binary without the nftables feature (no libnftnl, no libmnl).
static:
	cargo build --release --target $(MUSL) --no-default-features
	@echo "built target/$(MUSL)/release/raylimit"

static-check: static
	@file target/$(MUSL)/release/raylimit | grep -Eq "static(-pie)? linked" || { file target/$(MUSL)/release/raylimit; echo "not static"; exit 1; }
	@! ldd target/$(MUSL)/release/raylimit 2>/dev/null | grep -q "=>"
	env -i target/$(MUSL)/release/raylimit version
	@echo "static binary: no shared libraries (ldd: $$(ldd target/$(MUSL)/release/raylimit 2>&1 | head -1 | xargs))"

# Regenerate netlink-fixtures/ from iproute2 (needs root, iproute2, strace).
fixtures:
	bash netlink-fixtures/capture.sh

# Removes namespaces a killed test (rlt-) or bench (rlb-) run may have left behind (tests and
# benches remove their own; a bench also removes those of a bench that is gone).
clean-netns:
	@for n in $$(ip netns list 2>/dev/null | awk '{print $$1}' | grep -E '^rl[tb]-' || true); do ip netns del $$n; done

# Reconcile latency of `apply --file` at N = 1, 100, 1 000, 10 000 limits against tc -batch and
# one tc per object (benches/reconcile.rs; RAYLIMIT_BENCH_N=1,100 picks sizes), 5 runs each,
# then the codec. Writes target/bench-summary.json.
bench:
	cargo bench --bench reconcile
	cargo bench --bench codec

# The same with 3 runs per N, in under 3 minutes (an N whose projected time does not fit is
# skipped and reported); CI runs it after the tests.
bench-quick:
	cargo bench --bench reconcile -- --quick

# How a limit feels: wire rate, goodput, worst second, RTT under load and two-flow fairness per
# rate and direction (benches/accuracy.rs). Writes target/bench-accuracy.json.
bench-accuracy:
	cargo bench --bench accuracy

# Debian's stock kernel (linux-image-amd64) under qemu: the optional tc features this machine's
# kernel lacks (matchall, fw, gact, connmark), probed and used by the static binary (and the
# default build, for nftables) inside the VM on real client and outbound traffic measured by the static rl-traffic (tests/stock-kernel/traffic.rs); on
# this machine first, the probe's verdicts and the u32 fallbacks in the plans
# (scripts/stock-kernel.sh, tests/stock-kernel/init.sh). One pass/FAIL line per check.
test-stock-kernel: static build
	cargo build --release --target $(MUSL) --no-default-features --example rl-traffic
	bash scripts/stock-kernel.sh
