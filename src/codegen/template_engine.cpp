#include "codegen/template_engine.hpp"

#include <cmath>
#include <memory>
#include <vector>

#include <fmt/format.h>

#include "kjit/kjit.hpp"

namespace kjit::codegen {

using nlohmann::json;

namespace {

struct Position {
  int line = 1;
  int column = 1;
};

[[noreturn]] void fail(std::string_view template_name, Position at, const std::string& what) {
  throw TemplateError(fmt::format("{}:{}:{}: {}", template_name, at.line, at.column, what));
}

// ---------------------------------------------------------------- expressions

struct Token {
  enum Kind { name, integer, real, string, op, end } kind = end;
  std::string text;
  json value;
  Position at;
};

class ExpressionLexer {
 public:
  ExpressionLexer(std::string_view tmpl, std::string_view text, Position start) : tmpl_(tmpl), text_(text), at_(start) {}

  std::vector<Token> tokens() {
    std::vector<Token> out;
    while (true) {
      skip_space();
      Token t;
      t.at = at_;
      if (i_ >= text_.size()) {
        out.push_back(t);
        return out;
      }
      char c = text_[i_];
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        t.kind = Token::name;
        while (i_ < text_.size() && (std::isalnum(static_cast<unsigned char>(text_[i_])) || text_[i_] == '_')) t.text += take();
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        bool is_real = false;
        while (i_ < text_.size()) {
          char d = text_[i_];
          if (std::isdigit(static_cast<unsigned char>(d))) { t.text += take(); continue; }
          if (d == '.' && !is_real && i_ + 1 < text_.size() && std::isdigit(static_cast<unsigned char>(text_[i_ + 1]))) {
            is_real = true; t.text += take(); continue;
          }
          if ((d == 'e' || d == 'E') && i_ + 1 < text_.size()) {
            is_real = true; t.text += take();
            if (text_[i_] == '-' || text_[i_] == '+') t.text += take();
            continue;
          }
          break;
        }
        t.kind = is_real ? Token::real : Token::integer;
        try {
          t.value = is_real ? json(std::stod(t.text)) : json(std::stoll(t.text));
        } catch (const std::exception&) {
          fail(tmpl_, t.at, fmt::format("bad number '{}'", t.text));
        }
      } else if (c == '"' || c == '\'') {
        t.kind = Token::string;
        take();
        std::string s;
        while (true) {
          if (i_ >= text_.size()) fail(tmpl_, t.at, "unterminated string literal");
          char d = take();
          if (d == c) break;
          if (d == '\\' && i_ < text_.size()) {
            char e = take();
            s += e == 'n' ? '\n' : e == 't' ? '\t' : e;
          } else {
            s += d;
          }
        }
        t.value = s;
      } else {
        static const char* two[] = {"//", "==", "!=", "<=", ">="};
        t.kind = Token::op;
        for (const char* op : two)
          if (text_.substr(i_, 2) == op) { t.text = op; take(); take(); break; }
        if (t.text.empty()) {
          if (std::string_view("()[].,|+-*/%~<>=").find(c) == std::string_view::npos)
            fail(tmpl_, t.at, fmt::format("unexpected character '{}'", c));
          t.text = std::string(1, take());
        }
      }
      out.push_back(std::move(t));
    }
  }

 private:
  void skip_space() {
    while (i_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[i_]))) take();
  }
  char take() {
    char c = text_[i_++];
    if (c == '\n') { ++at_.line; at_.column = 1; } else { ++at_.column; }
    return c;
  }
  std::string_view tmpl_, text_;
  Position at_;
  std::size_t i_ = 0;
};

struct Expr {
  enum Kind { literal, name, attribute, index, unary, binary, filter, test, conditional, list } kind;
  Position at;
  json value;                               // literal
  std::string text;                         // name, attribute, operator, filter or test name
  std::vector<std::shared_ptr<Expr>> kids;  // operands; filter: [subject, args...]
};
using ExprPtr = std::shared_ptr<Expr>;

class ExpressionParser {
 public:
  ExpressionParser(std::string_view tmpl, std::vector<Token> tokens) : tmpl_(tmpl), t_(std::move(tokens)) {}

  ExprPtr parse_all() {
    ExprPtr e = parse();
    expect_end();
    return e;
  }
  ExprPtr parse() { return conditional(); }

  const Token& peek() const { return t_[i_]; }
  bool at_end() const { return t_[i_].kind == Token::end; }
  bool is_op(std::string_view op) const { return t_[i_].kind == Token::op && t_[i_].text == op; }
  bool is_word(std::string_view w) const { return t_[i_].kind == Token::name && t_[i_].text == w; }
  Token next() { return t_[i_].kind == Token::end ? t_[i_] : t_[i_++]; }
  void expect_op(std::string_view op) {
    if (!is_op(op)) fail(tmpl_, peek().at, fmt::format("expected '{}', found {}", op, describe(peek())));
    ++i_;
  }
  std::string expect_name() {
    if (peek().kind != Token::name) fail(tmpl_, peek().at, fmt::format("expected a name, found {}", describe(peek())));
    return t_[i_++].text;
  }
  void expect_end() {
    if (!at_end()) fail(tmpl_, peek().at, fmt::format("unexpected {}", describe(peek())));
  }
  static std::string describe(const Token& t) {
    if (t.kind == Token::end) return "end of tag";
    if (t.kind == Token::string) return "string " + t.value.dump();
    return fmt::format("'{}'", t.text);
  }

 private:
  ExprPtr make(Expr::Kind k, Position at, std::string text = {}, std::vector<ExprPtr> kids = {}) {
    auto e = std::make_shared<Expr>();
    e->kind = k;
    e->at = at;
    e->text = std::move(text);
    e->kids = std::move(kids);
    return e;
  }
  ExprPtr conditional() {
    ExprPtr yes = logical_or();
    if (is_word("if")) {
      Position at = next().at;
      ExprPtr cond = logical_or();
      ExprPtr no;
      if (is_word("else")) { next(); no = conditional(); }
      else { no = make(Expr::literal, at); no->value = ""; }
      return make(Expr::conditional, at, "", {cond, yes, no});
    }
    return yes;
  }
  ExprPtr logical_or() {
    ExprPtr l = logical_and();
    while (is_word("or")) { Position at = next().at; l = make(Expr::binary, at, "or", {l, logical_and()}); }
    return l;
  }
  ExprPtr logical_and() {
    ExprPtr l = logical_not();
    while (is_word("and")) { Position at = next().at; l = make(Expr::binary, at, "and", {l, logical_not()}); }
    return l;
  }
  ExprPtr logical_not() {
    if (is_word("not")) { Position at = next().at; return make(Expr::unary, at, "not", {logical_not()}); }
    return comparison();
  }
  ExprPtr comparison() {
    ExprPtr l = concat();
    while (true) {
      if (is_op("==") || is_op("!=") || is_op("<") || is_op("<=") || is_op(">") || is_op(">=")) {
        Token op = next();
        l = make(Expr::binary, op.at, op.text, {l, concat()});
      } else if (is_word("in")) {
        Position at = next().at;
        l = make(Expr::binary, at, "in", {l, concat()});
      } else if (is_word("not") && i_ + 1 < t_.size() && t_[i_ + 1].kind == Token::name && t_[i_ + 1].text == "in") {
        Position at = next().at;
        next();
        l = make(Expr::unary, at, "not", {make(Expr::binary, at, "in", {l, concat()})});
      } else if (is_word("is")) {
        Position at = next().at;
        bool negate = false;
        if (is_word("not")) { next(); negate = true; }
        ExprPtr t = make(Expr::test, at, expect_name(), {l});
        l = negate ? make(Expr::unary, at, "not", {t}) : t;
      } else {
        return l;
      }
    }
  }
  ExprPtr concat() {
    ExprPtr l = additive();
    while (is_op("~")) { Position at = next().at; l = make(Expr::binary, at, "~", {l, additive()}); }
    return l;
  }
  ExprPtr additive() {
    ExprPtr l = multiplicative();
    while (is_op("+") || is_op("-")) { Token op = next(); l = make(Expr::binary, op.at, op.text, {l, multiplicative()}); }
    return l;
  }
  ExprPtr multiplicative() {
    ExprPtr l = unary();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      Token op = next();
      l = make(Expr::binary, op.at, op.text, {l, unary()});
    }
    return l;
  }
  ExprPtr unary() {
    if (is_op("-") || is_op("+")) { Token op = next(); return make(Expr::unary, op.at, op.text, {unary()}); }
    return filtered();
  }
  ExprPtr filtered() {
    ExprPtr e = postfix();
    while (is_op("|")) {
      Position at = next().at;
      ExprPtr f = make(Expr::filter, at, expect_name(), {e});
      if (is_op("(")) {
        next();
        if (!is_op(")")) {
          f->kids.push_back(parse());
          while (is_op(",")) { next(); f->kids.push_back(parse()); }
        }
        expect_op(")");
      }
      e = f;
    }
    return e;
  }
  ExprPtr postfix() {
    ExprPtr e = primary();
    while (true) {
      if (is_op(".")) {
        Position at = next().at;
        e = make(Expr::attribute, at, expect_name(), {e});
      } else if (is_op("[")) {
        Position at = next().at;
        ExprPtr i = parse();
        expect_op("]");
        e = make(Expr::index, at, "", {e, i});
      } else {
        return e;
      }
    }
  }
  ExprPtr primary() {
    Token t = next();
    switch (t.kind) {
      case Token::integer:
      case Token::real:
      case Token::string: {
        ExprPtr e = make(Expr::literal, t.at);
        e->value = t.value;
        return e;
      }
      case Token::name: {
        if (t.text == "true" || t.text == "True" || t.text == "false" || t.text == "False") {
          ExprPtr e = make(Expr::literal, t.at);
          e->value = (t.text[0] == 't' || t.text[0] == 'T');
          return e;
        }
        if (t.text == "none" || t.text == "None") return make(Expr::literal, t.at);
        return make(Expr::name, t.at, t.text);
      }
      case Token::op:
        if (t.text == "(") {
          ExprPtr e = parse();
          expect_op(")");
          return e;
        }
        if (t.text == "[") {
          ExprPtr e = make(Expr::list, t.at);
          if (!is_op("]")) {
            e->kids.push_back(parse());
            while (is_op(",")) { next(); e->kids.push_back(parse()); }
          }
          expect_op("]");
          return e;
        }
        break;
      case Token::end:
        break;
    }
    fail(tmpl_, t.at, fmt::format("expected an expression, found {}", describe(t)));
  }

  std::string_view tmpl_;
  std::vector<Token> t_;
  std::size_t i_ = 0;
};

// ----------------------------------------------------------------- statements

struct Node {
  enum Kind { raw, output, if_, for_, set, include } kind;
  Position at;
  std::string text;                                        // text
  ExprPtr expr;                                            // output, set, include, for's iterable
  std::vector<std::string> names;                          // for targets, set name
  std::vector<std::pair<ExprPtr, std::vector<Node>>> branches;  // if: (cond, body)...; for: one (nullptr, body)
  std::vector<Node> otherwise;                             // else
};

struct Tag {
  enum Kind { text, expression, statement } kind;
  std::string body;
  Position at;  // of the body's first character
};

// Splits template text into text and tags, applying whitespace control.
std::vector<Tag> split_tags(std::string_view name, std::string_view src) {
  std::vector<Tag> out;
  Position at;
  std::size_t i = 0;
  auto advance_to = [&](std::size_t j) {
    for (; i < j; ++i) {
      if (src[i] == '\n') { ++at.line; at.column = 1; } else { ++at.column; }
    }
  };
  bool strip_next = false, trim_newline = false;
  while (i < src.size()) {
    std::size_t open = src.find('{', i);
    while (open != std::string_view::npos && open + 1 < src.size() && std::string_view("{%#").find(src[open + 1]) == std::string_view::npos)
      open = src.find('{', open + 1);
    if (open + 1 >= src.size()) open = std::string_view::npos;
    std::string text(src.substr(i, open == std::string_view::npos ? std::string_view::npos : open - i));
    // Whether `text` begins a line: the template's start, or right after a newline.
    bool text_at_line_start = i == 0 || src[i - 1] == '\n';
    if (trim_newline && !text.empty() && text[0] == '\n') { text.erase(0, 1); text_at_line_start = true; }
    if (strip_next) {
      std::size_t k = 0;
      while (k < text.size() && std::isspace(static_cast<unsigned char>(text[k]))) ++k;
      text.erase(0, k);
    }
    strip_next = trim_newline = false;
    if (open == std::string_view::npos) {
      if (!text.empty()) out.push_back({Tag::text, text, at});
      break;
    }
    advance_to(open);
    Position tag_at = at;
    char kind = src[open + 1];
    const char* close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
    std::size_t body_start = open + 2;
    bool strip_before = body_start < src.size() && src[body_start] == '-';
    if (strip_before) ++body_start;
    std::size_t end = src.find(close, body_start);
    if (end == std::string_view::npos)
      fail(name, tag_at, fmt::format("'{{{}' is never closed with '{}'", kind, close));
    bool strip_after = end > body_start && src[end - 1] == '-';
    std::size_t body_end = strip_after ? end - 1 : end;
    if (strip_before) {
      while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back()))) text.pop_back();
    } else if (kind != '{') {
      // lstrip_blocks: a block tag preceded on its line only by blanks takes them away.
      std::size_t k = text.size();
      while (k > 0 && (text[k - 1] == ' ' || text[k - 1] == '\t')) --k;
      if (k > 0 ? text[k - 1] == '\n' : text_at_line_start) text.erase(k);
    }
    if (!text.empty()) out.push_back({Tag::text, text, tag_at});
    advance_to(body_start);
    Position body_at = at;
    if (kind != '#')
      out.push_back({kind == '{' ? Tag::expression : Tag::statement, std::string(src.substr(body_start, body_end - body_start)), body_at});
    advance_to(end + 2);
    strip_next = strip_after;
    trim_newline = kind != '{';  // trim_blocks
  }
  return out;
}

class TemplateParser {
 public:
  TemplateParser(std::string_view name, std::vector<Tag> tags) : name_(name), tags_(std::move(tags)) {}

  std::vector<Node> parse() {
    std::vector<Node> body = block({});
    if (i_ < tags_.size()) fail(name_, tags_[i_].at, "unexpected end tag");
    return body;
  }

 private:
  // Parses nodes until a statement whose keyword is in `stop`; leaves i_ on it.
  std::vector<Node> block(std::initializer_list<std::string_view> stop) {
    std::vector<Node> nodes;
    while (i_ < tags_.size()) {
      const Tag& t = tags_[i_];
      if (t.kind == Tag::text) {
        nodes.push_back(Node{Node::raw, t.at, t.body});
        ++i_;
        continue;
      }
      if (t.kind == Tag::expression) {
        Node n{Node::output, t.at};
        n.expr = ExpressionParser(name_, ExpressionLexer(name_, t.body, t.at).tokens()).parse_all();
        nodes.push_back(std::move(n));
        ++i_;
        continue;
      }
      std::string keyword = first_word(t.body);
      for (auto s : stop)
        if (keyword == s) return nodes;
      if (keyword == "if") nodes.push_back(parse_if());
      else if (keyword == "for") nodes.push_back(parse_for());
      else if (keyword == "set") nodes.push_back(parse_set());
      else if (keyword == "include") nodes.push_back(parse_include());
      else if (keyword == "endif" || keyword == "endfor" || keyword == "else" || keyword == "elif")
        fail(name_, t.at, fmt::format("'{}' without a matching opening tag", keyword));
      else
        fail(name_, t.at, fmt::format("unknown statement '{}'", keyword));
    }
    if (stop.size())
      fail(name_, open_at_, fmt::format("missing '{}' (the block opened here is never closed)", *stop.begin()));
    return nodes;
  }

  static std::string first_word(const std::string& body) {
    std::size_t b = body.find_first_not_of(" \t\r\n");
    if (b == std::string::npos) return {};
    std::size_t e = b;
    while (e < body.size() && (std::isalnum(static_cast<unsigned char>(body[e])) || body[e] == '_')) ++e;
    return body.substr(b, e - b);
  }

  ExpressionParser statement_parser(const Tag& t) {
    ExpressionParser p(name_, ExpressionLexer(name_, t.body, t.at).tokens());
    p.next();  // the keyword
    return p;
  }

  Node parse_if() {
    Node n{Node::if_, tags_[i_].at};
    Position opened = tags_[i_].at;
    while (true) {
      const Tag& t = tags_[i_];
      std::string keyword = first_word(t.body);
      ExpressionParser p = statement_parser(t);
      ExprPtr cond = keyword == "else" ? nullptr : p.parse();
      p.expect_end();
      ++i_;
      open_at_ = opened;
      std::vector<Node> body = block({"endif", "elif", "else"});
      if (keyword == "else") n.otherwise = std::move(body);
      else n.branches.emplace_back(cond, std::move(body));
      std::string closing = first_word(tags_[i_].body);
      if (closing == "endif") {
        ExpressionParser end = statement_parser(tags_[i_]);
        end.expect_end();
        ++i_;
        return n;
      }
      if (keyword == "else") fail(name_, tags_[i_].at, fmt::format("'{}' after 'else'", closing));
    }
  }

  Node parse_for() {
    const Tag& t = tags_[i_];
    Node n{Node::for_, t.at};
    ExpressionParser p = statement_parser(t);
    n.names.push_back(p.expect_name());
    if (p.is_op(",")) { p.next(); n.names.push_back(p.expect_name()); }
    if (!p.is_word("in")) fail(name_, p.peek().at, "expected 'in' in for statement");
    p.next();
    n.expr = p.parse();
    p.expect_end();
    ++i_;
    open_at_ = t.at;
    n.branches.emplace_back(nullptr, block({"endfor", "else"}));
    if (first_word(tags_[i_].body) == "else") {
      ++i_;
      open_at_ = t.at;
      n.otherwise = block({"endfor"});
    }
    ++i_;
    return n;
  }

  Node parse_set() {
    const Tag& t = tags_[i_];
    Node n{Node::set, t.at};
    ExpressionParser p = statement_parser(t);
    n.names.push_back(p.expect_name());
    p.expect_op("=");
    n.expr = p.parse();
    p.expect_end();
    ++i_;
    return n;
  }

  Node parse_include() {
    const Tag& t = tags_[i_];
    Node n{Node::include, t.at};
    ExpressionParser p = statement_parser(t);
    n.expr = p.parse();
    p.expect_end();
    ++i_;
    return n;
  }

  std::string_view name_;
  std::vector<Tag> tags_;
  std::size_t i_ = 0;
  Position open_at_;
};

// ------------------------------------------------------------------ rendering

bool truthy(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return false;
    case json::value_t::boolean: return v.get<bool>();
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: return v.get<std::int64_t>() != 0;
    case json::value_t::number_float: return v.get<double>() != 0.0;
    case json::value_t::string: return !v.get_ref<const std::string&>().empty();
    case json::value_t::array:
    case json::value_t::object: return !v.empty();
    default: return true;
  }
}

std::string to_text(const json& v) {
  switch (v.type()) {
    case json::value_t::string: return v.get<std::string>();
    case json::value_t::null: return "";
    case json::value_t::boolean: return v.get<bool>() ? "true" : "false";
    case json::value_t::number_float: return fmt::format("{}", v.get<double>());
    default: return v.dump();
  }
}

class Renderer {
 public:
  Renderer(std::string_view name, const TemplateLoader& loader, int depth) : name_(name), loader_(loader), depth_(depth) {}

  void render(const std::vector<Node>& nodes, std::vector<json>& scopes, std::string& out) {
    for (const Node& n : nodes) {
      switch (n.kind) {
        case Node::raw: out += n.text; break;
        case Node::output: out += to_text(eval(*n.expr, scopes)); break;
        case Node::set: scopes.back()[n.names[0]] = eval(*n.expr, scopes); break;
        case Node::if_: {
          bool done = false;
          for (const auto& [cond, body] : n.branches) {
            if (truthy(eval(*cond, scopes))) { render(body, scopes, out); done = true; break; }
          }
          if (!done) render(n.otherwise, scopes, out);
          break;
        }
        case Node::for_: render_for(n, scopes, out); break;
        case Node::include: {
          json target = eval(*n.expr, scopes);
          if (!target.is_string()) fail(name_, n.at, "include needs a template name string");
          std::string inc = target.get<std::string>();
          if (depth_ > 16) fail(name_, n.at, fmt::format("include of \"{}\" nests too deep (a cycle?)", inc));
          auto text = loader_(inc);
          if (!text) fail(name_, n.at, fmt::format("included template \"{}\" not found", inc));
          auto tags = split_tags(inc, *text);
          auto body = TemplateParser(inc, std::move(tags)).parse();
          Renderer(inc, loader_, depth_ + 1).render(body, scopes, out);
          break;
        }
      }
    }
  }

 private:
  void render_for(const Node& n, std::vector<json>& scopes, std::string& out) {
    json seq = eval(*n.expr, scopes);
    std::vector<json> items;
    if (seq.is_array()) {
      for (auto& x : seq) items.push_back(x);
    } else if (seq.is_object()) {
      for (auto it = seq.begin(); it != seq.end(); ++it)
        items.push_back(n.names.size() == 2 ? json::array({it.key(), it.value()}) : json(it.key()));
    } else {
      fail(name_, n.expr->at, fmt::format("cannot loop over a {}", seq.type_name()));
    }
    if (items.empty()) { render(n.otherwise, scopes, out); return; }
    for (std::size_t i = 0; i < items.size(); ++i) {
      json scope = json::object();
      if (n.names.size() == 2) {
        if (!items[i].is_array() || items[i].size() != 2)
          fail(name_, n.expr->at, "two loop names need pairs to unpack");
        scope[n.names[0]] = items[i][0];
        scope[n.names[1]] = items[i][1];
      } else {
        scope[n.names[0]] = items[i];
      }
      scope["loop"] = {{"index", i + 1}, {"index0", i}, {"first", i == 0}, {"last", i + 1 == items.size()},
                       {"length", items.size()}, {"revindex", items.size() - i}};
      scopes.push_back(std::move(scope));
      render(n.branches[0].second, scopes, out);
      scopes.pop_back();
    }
  }

  // nullopt when a name, attribute or index is undefined.
  std::optional<json> lookup(const Expr& e, std::vector<json>& scopes) {
    switch (e.kind) {
      case Expr::name:
        for (auto it = scopes.rbegin(); it != scopes.rend(); ++it)
          if (auto f = it->find(e.text); f != it->end()) return *f;
        return std::nullopt;
      case Expr::attribute: {
        auto base = lookup(*e.kids[0], scopes);
        if (!base || !base->is_object()) return std::nullopt;
        auto f = base->find(e.text);
        if (f == base->end()) return std::nullopt;
        return *f;
      }
      case Expr::index: {
        auto base = lookup(*e.kids[0], scopes);
        if (!base) return std::nullopt;
        json i = eval(*e.kids[1], scopes);
        if (base->is_array() && i.is_number_integer()) {
          auto k = i.get<std::int64_t>();
          if (k < 0) k += static_cast<std::int64_t>(base->size());
          if (k < 0 || k >= static_cast<std::int64_t>(base->size())) return std::nullopt;
          return (*base)[k];
        }
        if (base->is_object() && i.is_string()) {
          auto f = base->find(i.get<std::string>());
          if (f == base->end()) return std::nullopt;
          return *f;
        }
        fail(name_, e.at, fmt::format("cannot index a {} with a {}", base->type_name(), i.type_name()));
      }
      default: return eval(e, scopes);
    }
  }
  static std::string describe(const Expr& e) {
    switch (e.kind) {
      case Expr::name: return e.text;
      case Expr::attribute: return describe(*e.kids[0]) + "." + e.text;
      case Expr::index: return describe(*e.kids[0]) + "[...]";
      default: return "expression";
    }
  }

  json eval(const Expr& e, std::vector<json>& scopes) {
    switch (e.kind) {
      case Expr::literal: return e.value;
      case Expr::name:
      case Expr::attribute:
      case Expr::index: {
        auto v = lookup(e, scopes);
        if (!v) fail(name_, e.at, fmt::format("'{}' is undefined", describe(e)));
        return *v;
      }
      case Expr::list: {
        json a = json::array();
        for (auto& k : e.kids) a.push_back(eval(*k, scopes));
        return a;
      }
      case Expr::conditional:
        return truthy(eval(*e.kids[0], scopes)) ? eval(*e.kids[1], scopes) : eval(*e.kids[2], scopes);
      case Expr::unary: {
        json v = eval(*e.kids[0], scopes);
        if (e.text == "not") return !truthy(v);
        if (!v.is_number()) fail(name_, e.at, fmt::format("unary '{}' needs a number, got {}", e.text, v.type_name()));
        if (e.text == "+") return v;
        return v.is_number_float() ? json(-v.get<double>()) : json(-v.get<std::int64_t>());
      }
      case Expr::test: {
        if (e.text == "defined") return lookup(*e.kids[0], scopes).has_value();
        if (e.text == "undefined") return !lookup(*e.kids[0], scopes).has_value();
        json v = eval(*e.kids[0], scopes);
        if (e.text == "none") return v.is_null();
        if (e.text == "string") return v.is_string();
        if (e.text == "number") return v.is_number();
        if (e.text == "even" || e.text == "odd") {
          if (!v.is_number_integer()) fail(name_, e.at, "'even'/'odd' need an integer");
          return (v.get<std::int64_t>() % 2 == 0) == (e.text == "even");
        }
        fail(name_, e.at, fmt::format("unknown test '{}'", e.text));
      }
      case Expr::binary: return binary(e, scopes);
      case Expr::filter: return filter(e, scopes);
    }
    fail(name_, e.at, "bad expression");
  }

  json binary(const Expr& e, std::vector<json>& scopes) {
    const std::string& op = e.text;
    if (op == "and") { json l = eval(*e.kids[0], scopes); return truthy(l) ? eval(*e.kids[1], scopes) : l; }
    if (op == "or") { json l = eval(*e.kids[0], scopes); return truthy(l) ? l : eval(*e.kids[1], scopes); }
    json l = eval(*e.kids[0], scopes), r = eval(*e.kids[1], scopes);
    if (op == "~") return to_text(l) + to_text(r);
    if (op == "==") return l == r;
    if (op == "!=") return l != r;
    if (op == "in") {
      if (r.is_array()) { for (auto& x : r) if (x == l) return true; return false; }
      if (r.is_object()) return l.is_string() && r.contains(l.get<std::string>());
      if (r.is_string() && l.is_string()) return r.get<std::string>().find(l.get<std::string>()) != std::string::npos;
      fail(name_, e.at, fmt::format("'in' cannot search a {}", r.type_name()));
    }
    if (op == "<" || op == "<=" || op == ">" || op == ">=") {
      if (!((l.is_number() && r.is_number()) || (l.is_string() && r.is_string())))
        fail(name_, e.at, fmt::format("cannot compare {} with {}", l.type_name(), r.type_name()));
      if (op == "<") return l < r;
      if (op == "<=") return l <= r;
      if (op == ">") return l > r;
      return l >= r;
    }
    if (op == "+" && l.is_string() && r.is_string()) return l.get<std::string>() + r.get<std::string>();
    if (op == "+" && l.is_array() && r.is_array()) { json a = l; for (auto& x : r) a.push_back(x); return a; }
    if (!l.is_number() || !r.is_number())
      fail(name_, e.at, fmt::format("'{}' needs numbers, got {} and {}", op, l.type_name(), r.type_name()));
    bool ints = l.is_number_integer() && r.is_number_integer();
    if (ints && op != "/") {
      std::int64_t a = l.get<std::int64_t>(), b = r.get<std::int64_t>();
      if (op == "+") return a + b;
      if (op == "-") return a - b;
      if (op == "*") return a * b;
      if (b == 0) fail(name_, e.at, "division by zero");
      if (op == "//") { std::int64_t q = a / b; if ((a % b != 0) && ((a < 0) != (b < 0))) --q; return q; }
      if (op == "%") { std::int64_t m = a % b; if (m != 0 && ((m < 0) != (b < 0))) m += b; return m; }
    }
    double a = l.get<double>(), b = r.get<double>();
    if (op == "+") return a + b;
    if (op == "-") return a - b;
    if (op == "*") return a * b;
    if (b == 0) fail(name_, e.at, "division by zero");
    if (op == "/") return a / b;
    if (op == "//") return std::floor(a / b);
    if (op == "%") return std::fmod(a, b);
    fail(name_, e.at, fmt::format("unknown operator '{}'", op));
  }

  json filter(const Expr& e, std::vector<json>& scopes) {
    const std::string& f = e.text;
    std::size_t nargs = e.kids.size() - 1;
    auto need = [&](std::size_t lo, std::size_t hi) {
      if (nargs < lo || nargs > hi) fail(name_, e.at, fmt::format("filter '{}' takes {}..{} arguments, got {}", f, lo, hi, nargs));
    };
    auto arg = [&](std::size_t i) { return eval(*e.kids[i + 1], scopes); };
    if (f == "default") {
      need(1, 1);
      auto v = lookup(*e.kids[0], scopes);
      return v && !v->is_null() ? *v : arg(0);
    }
    json v = eval(*e.kids[0], scopes);
    auto need_type = [&](bool ok, const char* what) {
      if (!ok) fail(name_, e.at, fmt::format("filter '{}' needs {}, got {}", f, what, v.type_name()));
    };
    if (f == "upper" || f == "lower") {
      need(0, 0);
      need_type(v.is_string(), "a string");
      std::string s = v.get<std::string>();
      for (auto& c : s) c = static_cast<char>(f == "upper" ? std::toupper(static_cast<unsigned char>(c)) : std::tolower(static_cast<unsigned char>(c)));
      return s;
    }
    if (f == "length") {
      need(0, 0);
      need_type(v.is_array() || v.is_object() || v.is_string(), "a list, mapping or string");
      return v.is_string() ? v.get<std::string>().size() : v.size();
    }
    if (f == "join") {
      need(0, 1);
      need_type(v.is_array(), "a list");
      std::string sep = nargs ? to_text(arg(0)) : "";
      std::string s;
      for (std::size_t i = 0; i < v.size(); ++i) s += (i ? sep : "") + to_text(v[i]);
      return s;
    }
    if (f == "int") {
      need(0, 0);
      if (v.is_string()) {
        try { return std::stoll(v.get<std::string>()); } catch (...) { fail(name_, e.at, "filter 'int': not a number"); }
      }
      need_type(v.is_number() || v.is_boolean(), "a number");
      return v.is_boolean() ? json(v.get<bool>() ? 1 : 0) : json(static_cast<std::int64_t>(v.get<double>()));
    }
    if (f == "float") { need(0, 0); need_type(v.is_number(), "a number"); return v.get<double>(); }
    if (f == "string") { need(0, 0); return to_text(v); }
    if (f == "abs") {
      need(0, 0);
      need_type(v.is_number(), "a number");
      return v.is_number_integer() ? json(std::llabs(v.get<std::int64_t>())) : json(std::fabs(v.get<double>()));
    }
    if (f == "replace") {
      need(2, 2);
      need_type(v.is_string(), "a string");
      std::string s = v.get<std::string>(), a = to_text(arg(0)), b = to_text(arg(1));
      if (a.empty()) return s;
      for (std::size_t p = s.find(a); p != std::string::npos; p = s.find(a, p + b.size())) s.replace(p, a.size(), b);
      return s;
    }
    if (f == "min" || f == "max" || f == "first" || f == "last") {
      need(0, 0);
      need_type(v.is_array() && !v.empty(), "a non-empty list");
      if (f == "first") return v.front();
      if (f == "last") return v.back();
      json best = v[0];
      for (auto& x : v) if (f == "min" ? x < best : best < x) best = x;
      return best;
    }
    if (f == "cfloat") {  // a float literal C++ reads back exactly: 1e-06f, 2.0f
      need(0, 0);
      need_type(v.is_number(), "a number");
      double d = v.get<double>();
      if (!std::isfinite(d)) fail(name_, e.at, "filter 'cfloat': value is not finite");
      std::string s = fmt::format("{}", static_cast<float>(d));
      if (s.find_first_of(".eE") == std::string::npos) s += ".0";
      return s + "f";
    }
    if (f == "cbool") { need(0, 0); return truthy(v) ? "true" : "false"; }
    fail(name_, e.at, fmt::format("unknown filter '{}'", f));
  }

  std::string_view name_;
  const TemplateLoader& loader_;
  int depth_;
};

}  // namespace

std::string render_template_text(std::string_view name, std::string_view text, const json& context,
                                 const TemplateLoader& loader) {
  auto body = TemplateParser(name, split_tags(name, text)).parse();
  std::vector<json> scopes{context.is_object() ? context : json::object(), json::object()};
  std::string out;
  Renderer(name, loader, 0).render(body, scopes, out);
  return out;
}

std::string render_template(std::string_view name, const json& context, const TemplateLoader& loader) {
  auto text = loader(name);
  if (!text) throw TemplateError(fmt::format("template \"{}\" not found", name));
  return render_template_text(name, *text, context, loader);
}

}  // namespace kjit::codegen
