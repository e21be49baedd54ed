// Why: each `keel` subcommand is one function taking its own argv tail; main.cpp only dispatches. Errors are
// thrown (ConfigError, DataError, std::runtime_error) and turned into a message + non-zero exit by main.
#pragma once

#include <string>
#include <vector>

namespace keel::cli {

using Args = std::vector<std::string>;  // arguments after the subcommand name

int cmd_train(const Args& args);
int cmd_resume(const Args& args);
int cmd_plugins(const Args& args);
int cmd_control(const Args& args);  // control RUN_DIR swap SLOT=NAME
int cmd_data(const Args& args);     // data prepare | data show-batch
int cmd_inspect(const Args& args);
int cmd_config(const Args& args);  // config keys | config show
int cmd_launch(const Args& args);  // launch --nproc N -- CMD ARGS...
int cmd_export_hf(const Args& args);
int cmd_import_hf(const Args& args);
int cmd_score(const Args& args);  // score CKPT|RUN --tokens FILE.npy|--text FILE: per-sequence NLL
int cmd_eval(const Args& args);
int cmd_report(const Args& args);      // report RUN_DIR... -o FILE.html
int cmd_plan(const Args& args);        // plan --config FILE [--nproc N]: memory and traffic per rank
int cmd_verify(const Args& args);      // verify RUN_DIR [--from CKPT] [--steps K]: replay and compare bit for bit
int cmd_forensics(const Args& args);   // forensics RUN_DIR --step N: replay one step, attribute it, skip list
int cmd_tournament(const Args& args);  // tournament --from CKPT --arms FILE --steps K: remediation arms compared
std::string usage();

}  // namespace keel::cli
