// The library's one logger (spdlog, to stderr). KJIT_LOG_LEVEL=debug|info|warn|error|off.
#pragma once
#include <string>

namespace kjit::log {
void debug(const std::string& message);
void info(const std::string& message);
void warn(const std::string& message);
}  // namespace kjit::log
