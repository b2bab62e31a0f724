#!/usr/bin/env bash
# CLI exit codes (0 ok, 1 failure, 2 bad usage or bad input) and messages.
set -u
kjit=$1
root=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export KJIT_CACHE_DIR=$work/cache
failures=0
passes=0
spec='{"op": "rmsnorm", "hidden_size": 512, "dtype": "float16"}'

# expect CODE PATTERN -- command...: runs it, checks the exit code and that the output matches PATTERN.
expect() {
  local code=$1 pattern=$2
  shift 3
  local out rc
  out=$("$@" 2>&1)
  rc=$?
  if [[ $rc -ne $code ]] || ! grep -qE -- "$pattern" <<<"$out"; then
    echo "FAIL: $* -> exit $rc (want $code), output:"
    echo "$out" | head -20
    echo "(wanted /$pattern/)"
    failures=$((failures + 1))
  else
    echo "ok:   exit $rc  $*"
    passes=$((passes + 1))
  fi
}

has_gpu=0
"$kjit" doctor | grep -q '^gpu 0:' && has_gpu=1

expect 0 'Usage|Subcommands'            -- "$kjit" --help
expect 0 'pregen'                       -- "$kjit" pregen --help
expect 2 'A subcommand is required'     -- "$kjit"
expect 2 'unknown command "frobnicate"; commands: doctor' -- "$kjit" frobnicate
expect 2 'required'                     -- "$kjit" render
expect 0 'nvrtc:'                       -- "$kjit" doctor
expect 0 'extern "C" __global__'        -- "$kjit" render "$spec"
expect 2 'unknown op "nope"'            -- "$kjit" render '{"op": "nope"}'
expect 2 'field "hidden_size" is missing' -- "$kjit" render '{"op": "rmsnorm", "dtype": "float16"}'
expect 2 'not valid JSON'               -- "$kjit" render '{"op": '
expect 2 'neither inline JSON nor a readable file' -- "$kjit" render /no/such/spec.json
expect 0 'hidden=\*/7168'            -- "$kjit" render "$root/tests/data/definitions/rmsnorm/rmsnorm_h7168.json"
expect 0 'miss, compiled'               -- "$kjit" compile --arch sm_90a "$spec"
expect 0 'hit \(disk\)'                 -- "$kjit" compile --arch sm_90a "$spec"
expect 0 'registers  [0-9]+  spill stores 0 bytes  stack 0 bytes' -- "$kjit" compile --arch sm_90a "$spec"
expect 2 'not an sm_XY'                 -- "$kjit" compile --arch volta "$spec"
expect 0 'cubin      .*/k.cubin'         -- "$kjit" compile --arch sm_90a --cubin "$work/k.cubin" "$spec"
if [[ $(head -c 4 "$work/k.cubin" | od -An -c | tr -d ' ') == '177ELF' ]]; then passes=$((passes + 1)); else
  echo "FAIL: --cubin did not write an ELF file"; failures=$((failures + 1)); fi
expect 1 'cubin /nonexistent/k.cubin: cannot create' -- "$kjit" compile --arch sm_90a --cubin /nonexistent/k.cubin "$spec"
if [[ $has_gpu == 0 ]]; then
  expect 1 'pass --arch'                -- "$kjit" compile "$spec"
  expect 1 'libcuda|GPU'                -- "$kjit" bench "$spec" --shape batch_size=8
fi
expect 0 '1 entries ok, 0 damaged'      -- "$kjit" cache verify
expect 0 'rmsnorm'                      -- "$kjit" cache ls
expect 2 'not a size'                   -- "$kjit" cache prune --max-size lots
expect 0 'freed'                        -- "$kjit" cache prune --max-size 0
expect 0 'removed 0 entries'            -- "$kjit" cache clear
expect 2 'ls \| verify|not in|is not'   -- "$kjit" cache explode
expect 2 'config .* cannot be read'     -- "$kjit" pregen /no/config.json --arch sm_90a --out "$work/b"
expect 0 'bundle .*: 14 kernels'        -- "$kjit" pregen "$root/configs/llama-3.1-8b.json" --out "$work/bundle" -j 2
expect 0 'hit \(bundle\)'               -- env KJIT_DISABLE_NVRTC=1 "$kjit" compile --arch sm_90a --no-disk-cache --bundle "$work/bundle" '{"op": "rmsnorm_fp8_quant", "hidden_size": 4096, "dtype": "bfloat16"}'
expect 1 'NVRTC is disabled'            -- env KJIT_DISABLE_NVRTC=1 "$kjit" compile --arch sm_90a --no-disk-cache --bundle "$work/bundle" "$spec"
expect 1 'NVRTC is disabled'            -- env KJIT_DISABLE_NVRTC=1 "$kjit" doctor

# tools/template-ab against a stand-in for `kjit bench` (no GPU here): its table and refusals.
cat >"$work/fake-bench" <<'FAKE'
#!/usr/bin/env bash
rate=600.0; [[ -n ${KJIT_TEMPLATE_DIR:-} ]] && rate=630.0
echo '{"op":"batch_prefill"} batch_size=8 seq_len=1024 kv_len=1024     157.98     '"$rate"' TFLOP/s   1062 GB/s  25.1%'
FAKE
chmod +x "$work/fake-bench"
expect 0 '\| 1 \| 8 x 1024 \| 600.0 / 600.0 TFLOP/s \| 630.0 / 630.0 TFLOP/s \(\+5.0%\) \|' -- \
  python3 "$root/tools/template-ab" --kjit "$work/fake-bench" --shape 8x1024 built=- tree="$root/templates"
# a decode spec: SEQ is the KV length (--axis), and the back-to-back rate is the one compared
cat >"$work/fake-decode" <<'FAKE'
#!/usr/bin/env bash
[[ " $* " == *" kv_len=4096 "* ]] || exit 0  # no line: template-ab must refuse
rate=2900; [[ -n ${KJIT_TEMPLATE_DIR:-} ]] && rate=2958
echo '{"op":"batch_decode"} batch_size=64 kv_len=4096     365.06      2944   98.3%  (1 chunk(s) of 4096; back to back 360.97 us = '"$rate"' GB/s)'
FAKE
chmod +x "$work/fake-decode"
expect 0 '\| 1 \| 64 x 4096 \| 2900.0 GB/s back to back \| 2958.0 GB/s back to back \(\+2.0%\) \|' -- \
  python3 "$root/tools/template-ab" --kjit "$work/fake-decode" --axis kv_len --rounds 1 --shape 64x4096 built=- tree="$root/templates"
expect 1 'expected 1 bench lines'       -- python3 "$root/tools/template-ab" --kjit "$work/fake-decode" --rounds 1 --shape 64x4096 a=-
expect 2 'not a templates directory'    -- python3 "$root/tools/template-ab" --kjit "$work/fake-bench" a=/no/such/dir
expect 2 'a shape is BATCHxSEQ'         -- python3 "$root/tools/template-ab" --shape 8 a=-

echo "$passes passed, $failures failed"
[[ $failures -eq 0 ]]
