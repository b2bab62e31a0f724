// A small Jinja subset for CUDA templates.
//
//   {{ expr }}                         expression output, with filters: {{ x | upper }}
//   {% if e %} {% elif e %} {% else %} {% endif %}
//   {% for x in list %} ... {% else %} ... {% endfor %}    (loop.index, index0, first, last, length)
//   {% for k, v in mapping %}                              (also over a list of pairs)
//   {% set name = expr %}
//   {% include "name" %}                                   (renders with the same context)
//   {# comment #}
//   {%- / -%} {{- / -}} {#- / -#}                          strip whitespace on that side
//
// Expressions: literals (ints, floats, "strings", true/false/none, [lists]),
// names, a.b, a[i], + - * / // % ~ (concat), == != < <= > >=, and or not, in,
// `x if c else y`, `x is defined`, `x is none`, and filters with arguments.
// Filters: upper, lower, length, join(sep), default(v), int, float, string,
// replace(a, b), abs, min, max, first, last, cfloat (a C float literal), cbool.
//
// As with Jinja's trim_blocks + lstrip_blocks, a line that holds only a block
// tag leaves no blank line behind. An undefined name is an error (not empty),
// so typos fail loudly. Errors are TemplateError("name:line:col: what").
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace kjit::codegen {

// Returns a template's text by name, or nullopt if there is none.
using TemplateLoader = std::function<std::optional<std::string>(std::string_view name)>;

std::string render_template(std::string_view name, const nlohmann::json& context, const TemplateLoader& loader);

// Renders template text directly (name is used in messages and for includes).
std::string render_template_text(std::string_view name, std::string_view text, const nlohmann::json& context,
                                 const TemplateLoader& loader);

}  // namespace kjit::codegen
