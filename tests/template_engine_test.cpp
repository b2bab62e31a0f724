#include <catch2/catch.hpp>

#include "codegen/template_engine.hpp"
#include "codegen/template_store.hpp"
#include "kjit/kjit.hpp"

using kjit::codegen::render_template_text;
using nlohmann::json;

namespace {
std::optional<std::string> no_files(std::string_view) { return std::nullopt; }

std::string render(std::string_view text, const json& context = json::object(),
                   const kjit::codegen::TemplateLoader& loader = no_files) {
  return render_template_text("t.j2", text, context, loader);
}

// The TemplateError message for a template, or "" if it rendered.
std::string error_of(std::string_view text, const json& context = json::object()) {
  try {
    render(text, context);
  } catch (const kjit::TemplateError& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST_CASE("expressions and filters", "[template]") {
  json c = {{"n", 7}, {"x", 2.5}, {"s", "bf16"}, {"list", {1, 2, 3}}, {"m", {{"a", 1}, {"b", 2}}}, {"flag", true}};
  CHECK(render("{{ n }}", c) == "7");
  CHECK(render("{{ n * 2 + 1 }}", c) == "15");
  CHECK(render("{{ n // 2 }} {{ n % 4 }} {{ -n // 2 }}", c) == "3 3 -4");
  CHECK(render("{{ n / 2 }}", c) == "3.5");
  CHECK(render("{{ (n + 1) * 2 }}", c) == "16");
  CHECK(render("{{ s ~ '_' ~ n }}", c) == "bf16_7");
  CHECK(render("{{ s | upper }} {{ 'ABC' | lower }}", c) == "BF16 abc");
  CHECK(render("{{ list | length }} {{ list | join(', ') }}", c) == "3 1, 2, 3");
  CHECK(render("{{ list[1] }} {{ list[-1] }} {{ m.b }} {{ m['a'] }}", c) == "2 3 2 1");
  CHECK(render("{{ missing | default(42) }} {{ n | default(0) }}", c) == "42 7");
  CHECK(render("{{ x | int }} {{ n | float }} {{ '12' | int + 1 }}", c) == "2 7 13");
  CHECK(render("{{ 1e-6 | cfloat }} {{ 2 | cfloat }} {{ flag | cbool }}", c) == "1e-06f 2.0f true");
  CHECK(render("{{ s | replace('bf', 'fp') }} {{ (-3) | abs }} {{ -3 | abs }}", c) == "fp16 3 -3");  // filters bind tighter than unary minus, as in Jinja
  CHECK(render("{{ list | min }} {{ list | max }} {{ list | first }} {{ list | last }}", c) == "1 3 1 3");
  CHECK(render("{{ 'yes' if flag else 'no' }} {{ 'yes' if not flag else 'no' }}", c) == "yes no");
  CHECK(render("{{ n > 3 and n < 10 }} {{ n == 7 or false }} {{ 2 in list }} {{ 'a' in m }} {{ 5 not in list }}", c) ==
        "true true true true true");
  CHECK(render("{{ n is defined }} {{ nope is defined }} {{ nope is undefined }} {{ n is odd }}", c) ==
        "true false true true");
  CHECK(render("{{ [1, 2] + [3] }}", c) == "[1,2,3]");
  CHECK(render("{{ \"q\\\"uote\" }}", c) == "q\"uote");
}

TEST_CASE("statements", "[template]") {
  json c = {{"items", {"a", "b", "c"}}, {"k", 2}, {"m", {{"x", 1}, {"y", 2}}}, {"empty", json::array()}};
  CHECK(render("{% if k == 1 %}one{% elif k == 2 %}two{% else %}many{% endif %}", c) == "two");
  CHECK(render("{% if k > 5 %}big{% else %}small{% endif %}", c) == "small");
  CHECK(render("{% for i in items %}{{ loop.index }}{{ i }}{% if not loop.last %},{% endif %}{% endfor %}", c) ==
        "1a,2b,3c");
  CHECK(render("{% for i in items %}{{ loop.index0 }}{{ loop.first }}{{ loop.length }} {% endfor %}", c) ==
        "0true3 1false3 2false3 ");
  CHECK(render("{% for key, value in m %}{{ key }}={{ value }};{% endfor %}", c) == "x=1;y=2;");
  CHECK(render("{% for i in empty %}x{% else %}none{% endfor %}", c) == "none");
  CHECK(render("{% set total = k * 10 %}{{ total }}", c) == "20");
  CHECK(render("{% for i in items %}{% set last = i %}{% endfor %}{{ last is defined }}", c) == "false");
  CHECK(render("a{# a comment {{ not rendered }} #}b", c) == "ab");
}

TEST_CASE("include renders with the same context", "[template]") {
  auto loader = [](std::string_view name) -> std::optional<std::string> {
    if (name == "inner.j2") return std::string("[{{ v }}]");
    if (name == "loop.j2") return std::string("{% include 'loop.j2' %}");
    return std::nullopt;
  };
  CHECK(render("<{% include 'inner.j2' %}>", {{"v", 5}}, loader) == "<[5]>");
  CHECK_THROWS_WITH(render("{% include 'missing.j2' %}", {}, loader), Catch::Contains("t.j2:1:3") && Catch::Contains("missing.j2"));
  CHECK_THROWS_WITH(render("{% include 'loop.j2' %}", {}, loader), Catch::Contains("too deep"));
}

TEST_CASE("whitespace control and block lines", "[template]") {
  CHECK(render("a  {{- 1 -}}  b") == "a1b");
  CHECK(render("a\n  {%- if true %}x{% endif -%}  \nb") == "ax" "b");
  // A line holding only a block tag leaves no blank line (trim_blocks + lstrip_blocks).
  CHECK(render("line1\n  {% if true %}\nline2\n  {% endif %}\nline3\n") == "line1\nline2\nline3\n");
  CHECK(render("{% for i in [1, 2] %}\n{{ i }}\n{% endfor %}\n") == "1\n2\n");
  CHECK(render("x {% if true %}y{% endif %} z") == "x y z");
  CHECK(render("a\n{# note #}\nb") == "a\nb");
}

TEST_CASE("every error names template, line and column", "[template]") {
  CHECK_THROWS_AS(render("{{ nope }}"), kjit::TemplateError);
  CHECK(error_of("line\n  {{ nope }}") == "t.j2:2:6: 'nope' is undefined");
  CHECK(error_of("{{ m.missing }}", {{"m", json::object()}}) == "t.j2:1:5: 'm.missing' is undefined");
  CHECK(error_of("{{ 1 + }}") == "t.j2:1:8: expected an expression, found end of tag");
  CHECK(error_of("{{ 1 2 }}") == "t.j2:1:6: unexpected '2'");
  CHECK(error_of("{{ 'open }}").find("unterminated string") != std::string::npos);
  CHECK(error_of("ab {{ x") == "t.j2:1:4: '{{' is never closed with '}}'");
  CHECK(error_of("{% if true %}x") == "t.j2:1:3: missing 'endif' (the block opened here is never closed)");
  CHECK(error_of("{% for i in [1] %}x") == "t.j2:1:3: missing 'endfor' (the block opened here is never closed)");
  CHECK(error_of("x\n{% endif %}") == "t.j2:2:3: 'endif' without a matching opening tag");
  CHECK(error_of("{% frobnicate %}") == "t.j2:1:3: unknown statement 'frobnicate'");
  CHECK(error_of("{{ 1 | nofilter }}") == "t.j2:1:6: unknown filter 'nofilter'");
  CHECK(error_of("{{ 'a' | join }}") == "t.j2:1:8: filter 'join' needs a list, got string");
  CHECK(error_of("{{ 1 / 0 }}") == "t.j2:1:6: division by zero");
  CHECK(error_of("{{ 'a' - 1 }}") == "t.j2:1:8: '-' needs numbers, got string and number");
  CHECK(error_of("{% for x in 5 %}{% endfor %}") == "t.j2:1:13: cannot loop over a number");
  CHECK(error_of("{% if true %}{% else %}{% elif false %}{% endif %}") == "t.j2:1:26: 'elif' after 'else'");
  CHECK(error_of("{{ x | default }}").find("filter 'default' takes 1..1 arguments, got 0") != std::string::npos);
  CHECK(error_of("{{ 3 is frob }}") == "t.j2:1:6: unknown test 'frob'");
  CHECK(error_of("{{ $ }}") == "t.j2:1:4: unexpected character '$'");
}

TEST_CASE("the embedded templates render", "[template]") {
  auto text = kjit::codegen::load_template_file("norm.cu.j2");
  REQUIRE(text);
  CHECK(text->find("extern \"C\"") != std::string::npos);
  CHECK_FALSE(kjit::codegen::load_template_file("no-such.j2"));
  CHECK_FALSE(kjit::codegen::load_template_file("../CMakeLists.txt"));
}
