// Why: slot names, their chain property and the config field each one reads live in one table
// (core/plugin_host/slots.h). These tests tie that table to the SDK's bits and to the config keys plugins.NAME,
// so that a slot added in one place and not the other fails here, and check the refusal of an unknown slot.
#include <gtest/gtest.h>

#include <set>

#include "core/config/config.h"
#include "core/plugin_host/slots.h"
#include "tests/unit/test_support.h"

namespace ph = keel::plugin_host;

TEST(PluginSlots, TableMatchesTheSdkBitsAndTheConfigKeys) {
  const auto& table = ph::slot_table();
  ASSERT_EQ(table.size(), 6u);
  std::set<std::string> names;
  uint32_t bits = 0;
  for (size_t i = 0; i < table.size(); ++i) {
    const ph::SlotInfo& slot = table[i];
    EXPECT_EQ(static_cast<uint32_t>(slot.bit), 1u << i) << slot.name;  // SDK bit order
    bits |= slot.bit;
    names.insert(slot.name);
    EXPECT_EQ(&ph::slot_info(slot.name), &slot);
    EXPECT_EQ(ph::parse_slot(slot.name), slot.bit);
    // The field is the one the config key plugins.NAME sets.
    keel::Config config;
    keel::apply_override(config, std::string("plugins.") + slot.name + "=probe_" + slot.name);
    EXPECT_EQ(config.plugins.*slot.field, std::string("probe_") + slot.name);
  }
  EXPECT_EQ(names.size(), table.size());
  EXPECT_EQ(bits, (1u << table.size()) - 1);
  EXPECT_TRUE(ph::slot_info("grad_transform").chain);
  EXPECT_TRUE(ph::slot_info("observers").chain);
  for (const char* single : {"optimizer", "lr_schedule", "spike_handler", "data_mixture"})
    EXPECT_FALSE(ph::slot_info(single).chain) << single;
  EXPECT_EQ(ph::slot_names(keel::sdk::kOptimizer | keel::sdk::kObserver), "optimizer,observers");
}

TEST(PluginSlots, UnknownSlotIsRefusedNamingTheKnownOnes) {
  EXPECT_EQ(keel::testing::error_of([] { ph::slot_info("warp_drive"); }),
            "unknown plugin slot 'warp_drive' (slots: optimizer, lr_schedule, spike_handler, grad_transform, "
            "data_mixture, observers)");
}
